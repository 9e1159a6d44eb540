"""Matplotlib figures of a report. matplotlib is imported only when a plot is asked for.

They use the report view's SQNR bands and storage colours (``sqnr_bands.py``,
``report_view.css``) and a transparent background with mid-grey text, so that they read on
light and dark themes alike.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from workbench.analysis.sqnr_bands import BAND_COLORS, SQNR_GOOD_DB, SQNR_POOR_DB, sqnr_band

TEXT_COLOR = "#888888"
STORAGE_COLORS = {
    "weight_bytes": "#1f77b4",
    "scale_bytes": "#ff7f0e",
    "zero_point_bytes": "#9467bd",
    "bias_bytes": "#17becf",
}


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def themed(fig, *axes) -> None:
    """Transparent background, mid-grey text and spines: readable on light and dark."""
    fig.patch.set_alpha(0.0)
    for ax in axes:
        ax.set_facecolor("none")
        ax.tick_params(colors=TEXT_COLOR, labelcolor=TEXT_COLOR)
        for spine in ax.spines.values():
            spine.set_color(TEXT_COLOR)
        ax.xaxis.label.set_color(TEXT_COLOR)
        ax.yaxis.label.set_color(TEXT_COLOR)
        ax.title.set_color(TEXT_COLOR)
        legend = ax.get_legend()
        if legend is not None:
            legend.get_frame().set_alpha(0.0)
            for text in legend.get_texts():
                text.set_color(TEXT_COLOR)


def sqnr_bar_chart(layers: pd.DataFrame):
    """Per-layer output SQNR (dB), quantized layers only, coloured by the report's bands."""
    plt = _pyplot()
    quantized = layers[layers["status"] == "quantized"]
    values = quantized["output_sqnr_db"].astype(float).clip(upper=80.0).to_numpy()
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.18 * len(values) + 2)), 3.6))
    colors = [BAND_COLORS[sqnr_band(v) or "good"] for v in values]
    ax.bar(range(len(values)), values, color=colors)
    for threshold in (SQNR_POOR_DB, SQNR_GOOD_DB):
        ax.axhline(threshold, color=TEXT_COLOR, ls="--", lw=0.8)
    ax.set_xticks(range(len(values)))
    fontsize = 7 if len(values) <= 40 else 5
    ax.set_xticklabels(quantized["layer"], rotation=75, ha="right", fontsize=fontsize)
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title(
        f"Per-layer output SQNR vs FP32 (dashed: {SQNR_POOR_DB:.0f} and {SQNR_GOOD_DB:.0f} dB)"
    )
    themed(fig, ax)
    fig.tight_layout()
    plt.close(fig)
    return fig


def storage_breakdown_chart(storage: pd.DataFrame):
    """Stacked bars: FP32 bytes against weights / scales / zero points / bias per layer."""
    plt = _pyplot()
    rows = storage[storage["layer"] != "TOTAL"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.45 * len(rows) + 2)), 3.6))
    ax.bar(x - 0.2, rows["fp32_bytes"] / 1024, width=0.4, color=BAND_COLORS["fp32"], label="FP32")
    bottom = np.zeros(len(rows))
    parts = [("weight_bytes", "weights"), ("scale_bytes", "scales")]
    parts += [("zero_point_bytes", "zero points"), ("bias_bytes", "bias")]
    for column, label in parts:
        values = rows[column].to_numpy() / 1024
        if not values.any():  # no legend entry for a piece that is 0 B everywhere
            continue
        ax.bar(x + 0.2, values, width=0.4, bottom=bottom, label=label, color=STORAGE_COLORS[column])
        bottom += values
    ax.set_yscale("log")  # small layers and the scale / bias pieces stay visible
    ax.set_xticks(x)
    ax.set_xticklabels(rows["layer"], rotation=75, ha="right", fontsize=7 if len(rows) <= 40 else 5)
    ax.set_ylabel("KiB (log scale)")
    ax.set_title("Storage per layer: FP32 (left) vs quantized (right)")
    ax.legend(fontsize=7)
    themed(fig, ax)
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
    where = f", channel {channel}" if scale.numel() > 1 else ""
    if scheme.group_size is not None and wq.scale.dim() == 2:  # block-wise: the widest group
        row, group = divmod(channel, wq.scale.shape[1])
        start = group * scheme.group_size
        values = weight[row, start : start + scheme.group_size]
        where = f", channel {row} group {group}"
    s, z = float(scale[channel]), int(zero_point[channel])
    low, high = s * (scheme.quant_min - z), s * (scheme.quant_max - z)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.hist(values.reshape(-1).numpy(), bins=120, color="#1f77b4", alpha=0.8)
    if scheme.levels <= 64:
        for level in range(scheme.quant_min, scheme.quant_max + 1):
            ax.axvline(s * (level - z), color="#999999", lw=0.5, alpha=0.6)
    ax.axvline(low, color="#d62728", ls="--", label="clipping range")
    ax.axvline(high, color="#d62728", ls="--")
    ax.set_title(f"{name}{where}: weights, {scheme.describe()} grid (step {s:.3g})")
    ax.legend(fontsize=7)
    themed(fig, ax)
    fig.tight_layout()
    plt.close(fig)
    return fig
