"""Matplotlib figures of a report. matplotlib is imported only when a plot is asked for."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def sqnr_bar_chart(layers: pd.DataFrame):
    """Per-layer output SQNR (dB), quantized layers only; the worst in red."""
    plt = _pyplot()
    quantized = layers[layers["status"] == "quantized"]
    values = quantized["output_sqnr_db"].astype(float).clip(upper=80.0).to_numpy()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(values) + 2), 3.6))
    colors = ["#d62728" if v < 20 else "#ff7f0e" if v < 30 else "#2ca02c" for v in values]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(quantized["layer"], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title("Per-layer output SQNR vs FP32 (higher is better)")
    fig.tight_layout()
    plt.close(fig)
    return fig


def storage_breakdown_chart(storage: pd.DataFrame):
    """Stacked bars: FP32 bytes against weights / scales / zero points / bias per layer."""
    plt = _pyplot()
    rows = storage[storage["layer"] != "TOTAL"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 3.6))
    ax.bar(x - 0.2, rows["fp32_bytes"] / 1024, width=0.4, color="#bbbbbb", label="FP32")
    bottom = np.zeros(len(rows))
    parts = [("weight_bytes", "weights"), ("scale_bytes", "scales")]
    parts += [("zero_point_bytes", "zero points"), ("bias_bytes", "bias")]
    for column, label in parts:
        values = rows[column].to_numpy() / 1024
        ax.bar(x + 0.2, values, width=0.4, bottom=bottom, label=label)
        bottom += values
    ax.set_xticks(x)
    ax.set_xticklabels(rows["layer"], rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("KiB")
    ax.set_title("Storage per layer: FP32 (left) vs quantized (right)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def weight_histogram(layer, name: str):
    """Histogram of one layer's FP32 weights with the quantization grid and clipping range."""
    plt = _pyplot()
    weight = layer.layer.weight.detach().float()
    wq = layer.weight_quantizer
    scheme = wq.scheme
    scale = wq.scale.detach().reshape(-1)
    zero_point = wq.zero_point.detach().reshape(-1)
    channel = int(torch.argmax(scale)) if scale.numel() > 1 else 0
    values = weight.select(scheme.axis, channel) if scale.numel() > 1 else weight
    s, z = float(scale[channel]), int(zero_point[channel])
    low, high = s * (scheme.quant_min - z), s * (scheme.quant_max - z)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.hist(values.reshape(-1).numpy(), bins=120, color="#1f77b4", alpha=0.8)
    if scheme.levels <= 64:
        for level in range(scheme.quant_min, scheme.quant_max + 1):
            ax.axvline(s * (level - z), color="#999999", lw=0.5, alpha=0.6)
    ax.axvline(low, color="#d62728", ls="--", label="clipping range")
    ax.axvline(high, color="#d62728", ls="--")
    where = f", channel {channel}" if scale.numel() > 1 else ""
    ax.set_title(f"{name}{where}: weights, {scheme.describe()} grid (step {s:.3g})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig
