"""The per-layer table: scheme, qparams, weight error and measured output error per layer."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from workbench.core.metrics import ErrorAccumulator
from workbench.core.weight_codes import rows_of
from workbench.engine.capture.conv1d import Conv1DLinear
from workbench.engine.capture.modules import get_layer
from workbench.engine.placement.layers import QuantizedLayer

LAYER_COLUMNS = [
    "layer",
    "type",
    "status",
    "precision",
    "weight_bits",
    "activation_bits",
    "reason",
    "folded_into",
    "weight_shape",
    "scheme",
    "bits",
    "num_scales",
    "scale_min",
    "scale_max",
    "zero_point",
    "input_scale",
    "input_zero_point",
    "weight_mse",
    "weight_sqnr_db",
    "layer_sqnr_db",
    "output_sqnr_db",
    "output_cosine",
    "equalized",
    "smoothing",
    "bias_corrected",
    "weight_rounding",
]


def _zero_point_text(zero_point: torch.Tensor) -> str:
    values = zero_point.reshape(-1)
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}..{high}"


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight's shape as the user's layer holds it: ``(in, out)`` for a GPT-2 Conv1D,
    which the engine quantizes as a Linear holding ``(out, in)``."""
    if isinstance(module, Conv1DLinear):
        return tuple(module.conv1d_weight().shape)
    return tuple(module.weight.shape)


def smoothing_text(plan) -> str | None:
    """SmoothQuant on this layer, from the plan's fields: where ``1/s`` went and the alpha
    (``layernorm a=0.50``), or why the layer was not smoothed; None when SmoothQuant did not
    consider it (off, or not a Linear with a quantized input)."""
    if plan.smoothing_fold is not None and plan.smoothing_alpha is not None:
        return f"{plan.smoothing_fold} a={plan.smoothing_alpha:.2f}"
    return plan.smoothing_skipped


def layer_row(layer: QuantizedLayer, weight_rows: int | None = None) -> dict:
    """Scheme, qparams and weight error of one quantized layer; ``weight_rows``: the error of a
    larger 2-D weight is measured on that many evenly spaced rows (a bounded cost)."""
    with torch.no_grad():
        weight, quantized = _weight_and_quantized(layer, weight_rows)
        acc = ErrorAccumulator()
        acc.add(weight, quantized)
        weight = layer.layer.weight
    wq = layer.weight_quantizer
    scale = wq.scale.detach().reshape(-1)
    row = {
        "weight_shape": weight_shape(layer.layer),
        "scheme": wq.scheme.describe(),
        "bits": wq.scheme.bits,
        "num_scales": scale.numel(),
        "scale_min": float(scale.min()),
        "scale_max": float(scale.max()),
        "zero_point": _zero_point_text(wq.zero_point),
        "weight_mse": acc.mse,
        "weight_sqnr_db": acc.sqnr_db,
        "input_scale": float("nan"),
        "input_zero_point": None,
    }
    if layer.input_quantizer is not None and not layer.input_quantizer.dynamic:
        row["input_scale"] = float(layer.input_quantizer.scale)
        row["input_zero_point"] = int(layer.input_quantizer.zero_point)
    return row


def _weight_and_quantized(layer: QuantizedLayer, rows: int | None):
    weight = layer.layer.weight.detach()
    if rows is not None and weight.dim() == 2 and weight.shape[0] > rows:
        index = torch.linspace(0, weight.shape[0] - 1, rows).round().long()
        kept = layer.weight_quantizer.exact_codes(layer.layer.weight)  # the kept codes' key
        sample = rows_of(kept, index) if kept is not None else None
        if sample is not None:
            return weight[index].float(), sample.dequantize()
        return weight[index].float(), layer.quantized_weight().detach()[index].float()
    return weight.float(), layer.quantized_weight().detach().float()


def layer_table(
    quantized_model: nn.Module,
    plans: list,
    measured: dict[str, dict[str, float]],
    weight_rows: int | None = None,
) -> pd.DataFrame:
    """One row per parameter-holding layer, quantized or kept FP32 (with the reason);
    ``weight_rows`` as for ``layer_row``."""
    rows = []
    for plan in plans:
        row = {
            "layer": plan.name,
            "type": plan.layer_type,
            "status": plan.status,
            "precision": plan.precision,
            "reason": plan.reason,
            "folded_into": plan.folded_into,
            "equalized": plan.equalized,
            "smoothing": smoothing_text(plan),
            "bias_corrected": plan.bias_corrected,
            "weight_rounding": plan.weight_rounding,
        }
        module = get_layer(quantized_model, plan.name)
        if isinstance(module, QuantizedLayer):
            row |= layer_row(module, weight_rows)
            row |= measured.get(plan.name, {})
            row["weight_bits"] = module.weight_quantizer.scheme.bits
            if module.input_quantizer is not None:
                row["activation_bits"] = module.input_quantizer.scheme.bits
        elif module is not None and getattr(module, "weight", None) is not None:
            row["weight_shape"] = weight_shape(module)
            row["scheme"] = "fp32"
            row["bits"] = 32
        rows.append(row)
    table = pd.DataFrame(rows, columns=LAYER_COLUMNS)
    table["bits"] = table["bits"].astype("Int64")
    table["weight_bits"] = table["weight_bits"].astype("Int64")
    table["activation_bits"] = table["activation_bits"].astype("Int64")  # <NA>: FP32
    table["num_scales"] = table["num_scales"].astype("Int64")
    table["input_zero_point"] = table["input_zero_point"].astype("Int64")
    return table
