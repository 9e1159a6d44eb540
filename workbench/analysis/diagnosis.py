"""What a model and a first quantization report show about which PTQ method can help.

Three facts, each the reason a practitioner reaches for a method:

* **input outliers** (SmoothQuant): a Linear whose input has a few channels far wider than the
  rest; a per-tensor activation scale then leaves the other channels a few levels. Measured as
  each Linear input's per-channel ``max|x|`` on the calibration batches: the widest channel
  against the median channel (``outlier_ratio``).
* **depthwise convolutions** (cross-layer equalization, bias correction): per-channel ranges of
  depthwise kernels differ by orders of magnitude, and their errors have a mean that shifts
  the next layer's output.
* **weight error dominates** (AdaRound, GPTQ): in the report, each quantized layer's output
  error with FP32 input (``layer_sqnr_db``: weight and input quantization) against its weight
  error alone (``weight_sqnr_db``). When the two are within ``WEIGHT_DOMINATES_DB`` of each
  other for most layers, the layer's error is mostly its weights' rounding, which AdaRound
  and GPTQ choose better than nearest rounding; input quantization error would show as a
  layer SQNR well below the weight SQNR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from workbench.engine.calibration.batches import run_model
from workbench.engine.capture.modules import hooks_removed

OUTLIER_RATIO = 20.0  # widest input channel / median channel above this: outliers
OUTLIER_BATCHES = 4
WEIGHT_DOMINATES_DB = 3.0  # weight noise at least half of the layer's output noise
FLOOR = 1e-8


@dataclass(frozen=True)
class InputOutliers:
    """The Linear input with the widest channel against its median channel."""

    layer: str
    channel: int
    ratio: float

    def describe(self) -> str:
        return (
            f"input outliers: channel {self.channel} of {self.layer}'s input reaches "
            f"{self.ratio:.0f}x the median channel's max|x|"
        )


def input_channel_ranges(
    model: nn.Module, batches: Sequence[Any], max_batches: int = OUTLIER_BATCHES
) -> pd.DataFrame:
    """Per ``nn.Linear`` of ``model`` (FP32, eval mode): the widest input channel, its
    ``max|x|``, the median channel's ``max|x|`` and their ratio, on the first batches.
    Columns: ``layer``, ``channels``, ``widest_channel``, ``widest_max_abs``,
    ``median_max_abs``, ``outlier_ratio``."""
    amax: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, inputs):
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor) or x.dim() == 0 or not x.is_floating_point():
                return
            channel_max = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)
            seen = amax.get(name)
            amax[name] = channel_max if seen is None else torch.maximum(seen, channel_max)

        return hook

    handles = [
        module.register_forward_pre_hook(hook_for(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    with hooks_removed(handles), torch.no_grad():
        for index, batch in enumerate(batches[:max_batches]):
            run_model(model, batch, index)
    rows = []
    for name, channel_max in amax.items():
        median = float(channel_max.median())
        widest = int(channel_max.argmax())
        rows.append(
            {
                "layer": name,
                "channels": int(channel_max.numel()),
                "widest_channel": widest,
                "widest_max_abs": float(channel_max[widest]),
                "median_max_abs": median,
                "outlier_ratio": float(channel_max[widest]) / max(median, FLOOR),
            }
        )
    columns = ["layer", "channels", "widest_channel", "widest_max_abs", "median_max_abs"]
    return pd.DataFrame(rows, columns=[*columns, "outlier_ratio"])


def input_outliers(ranges: pd.DataFrame, ratio: float = OUTLIER_RATIO) -> InputOutliers | None:
    """The worst Linear input of ``input_channel_ranges`` when its ratio exceeds ``ratio``."""
    if ranges.empty:
        return None
    worst = ranges.loc[ranges["outlier_ratio"].idxmax()]
    if float(worst["outlier_ratio"]) < ratio:
        return None
    return InputOutliers(
        str(worst["layer"]), int(worst["widest_channel"]), float(worst["outlier_ratio"])
    )


def depthwise_convs(model: nn.Module) -> list[str]:
    """Names of the depthwise convolutions (one group per input channel, more than one)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        and module.groups > 1
        and module.groups == module.in_channels
    ]


def weight_error_dominates(layers: pd.DataFrame, margin_db: float = WEIGHT_DOMINATES_DB) -> bool:
    """Whether most quantized layers' output error (FP32 input) is their weight error: the
    median of ``weight_sqnr_db - layer_sqnr_db`` is below ``margin_db``. A weight-only report
    (no input quantized) is weight error by definition."""
    quantized = layers[layers["status"] == "quantized"]
    if quantized.empty:
        return False
    if quantized["activation_bits"].isna().all():
        return True
    gap = quantized["weight_sqnr_db"].astype(float) - quantized["layer_sqnr_db"].astype(float)
    gap = gap[gap.notna() & gap.abs().ne(float("inf"))]
    return bool(len(gap)) and float(gap.median()) < margin_db
