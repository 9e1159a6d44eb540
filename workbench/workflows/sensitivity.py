"""Per-layer sensitivity: how much each layer's quantization costs, from one calibration.

For every quantized layer, the metric is measured twice: with only that layer quantized
(what it costs by itself) and with every layer but that one quantized (what keeping it in
higher precision would win back). With ``eval_fn`` the metric is the user's (higher is better);
without it, the SQNR (dB) of the model's output against FP32 on the calibration batches (and
its cosine): what can be measured without a metric, lowest (most sensitive) first.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.core.metrics import ErrorAccumulator
from workbench.engine.calibration.batches import iter_batches, output_tensor, run_model
from workbench.engine.calibration.calibrate import (
    calibrate,
    finish_calibration,
    prepare_model,
    resolve_config,
)
from workbench.engine.calibration.eval_metric import check_eval_fn, measure_metric
from workbench.engine.capture.model_copy import user_model_copy
from workbench.engine.config import QuantConfig
from workbench.engine.placement.layers import iter_quantized_layers
from workbench.engine.quantizers.switches import quantize_only

METRIC_BATCHES = 8
SENSITIVITY_COLUMNS = [
    "layer",
    "type",
    "metric_only_this_quantized",
    "metric_all_but_this_quantized",
    "drop_only_this",
    "output_cosine_only_this",
]


class CalibratedModel:
    """A model calibrated once, whose layers can be switched between quantized and FP32, and
    a metric to measure it with (``eval_fn`` or the output SQNR against FP32)."""

    def __init__(
        self,
        model: nn.Module,
        calib_data: Any,
        config: QuantConfig | str | None,
        eval_fn: Callable[[nn.Module], float] | None,
        num_batches: int | None,
        progress: bool,
        caller: str = "wb.sensitivity",
    ) -> None:
        self.config = resolve_config(config)
        check_eval_fn(eval_fn, caller)
        self.original = user_model_copy(model, caller)  # the FP32 reference, in eval mode
        self.batches = list(iter_batches(calib_data, num_batches))
        self.fp32_model, self.model, self.plans = prepare_model(
            self.original, self.batches[0], self.config
        )
        reached = calibrate(self.model, self.batches, progress)
        finish_calibration(self.model, self.plans, reached)
        self.model.eval()
        self.layer_names = [name for name, _ in iter_quantized_layers(self.model)]
        type_of = {plan.name: plan.layer_type for plan in self.plans}  # Conv1D, not its Linear
        self.layer_types = {name: type_of[name] for name in self.layer_names}
        self.eval_fn = eval_fn
        self.eval_calls = 0
        self._reference = None

    def _reference_outputs(self) -> list[torch.Tensor]:
        if self._reference is None:
            with torch.no_grad():
                self._reference = [
                    output_tensor(run_model(self.fp32_model, batch, i))
                    for i, batch in enumerate(islice(self.batches, METRIC_BATCHES))
                ]
        return self._reference

    def output_error(self) -> ErrorAccumulator:
        acc = ErrorAccumulator()
        with torch.no_grad():
            for i, (batch, ref) in enumerate(
                zip(islice(self.batches, METRIC_BATCHES), self._reference_outputs(), strict=False)
            ):
                acc.add(ref, output_tensor(run_model(self.model, batch, i)))
        return acc

    def metric_fp32(self) -> float:
        """The FP32 metric (``eval_fn`` on the user's model; +inf dB without ``eval_fn``)."""
        if self.eval_fn is None:
            return float("inf")
        self.eval_calls += 1
        return measure_metric(self.eval_fn, self.original, "the FP32 model")

    def measure(self, quantized_layers, between_layers: bool = True) -> tuple[float, float]:
        """``(metric, output cosine)`` with exactly ``quantized_layers`` quantized."""
        quantized_layers = list(quantized_layers)
        quantize_only(self.model, quantized_layers, between_layers)
        acc = self.output_error()
        if self.eval_fn is None:
            return acc.sqnr_db, acc.cosine
        self.eval_calls += 1
        which = f"the model with {len(quantized_layers)} layer(s) quantized"
        return measure_metric(self.eval_fn, self.model, which), acc.cosine


def sensitivity_table(
    calibrated: CalibratedModel,
    progress: bool = True,
    on_layer: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """The sensitivity DataFrame of a calibrated model, most sensitive layer first.
    ``on_layer(done, total)`` is called after each layer (a progress bar's hook)."""
    baseline = calibrated.metric_fp32()
    names = calibrated.layer_names
    rows = []
    if on_layer is not None:
        on_layer(0, len(names))
    for done, name in enumerate(tqdm(names, desc="sensitivity", disable=not progress), 1):
        only, cosine_only = calibrated.measure([name], between_layers=False)
        all_but, _ = calibrated.measure([n for n in names if n != name])
        rows.append(
            {
                "layer": name,
                "type": calibrated.layer_types[name],
                "metric_only_this_quantized": only,
                "metric_all_but_this_quantized": all_but,
                "drop_only_this": baseline - only if calibrated.eval_fn else float("nan"),
                "output_cosine_only_this": cosine_only,
            }
        )
        if on_layer is not None:
            on_layer(done, len(names))
    quantize_only(calibrated.model, names)
    table = pd.DataFrame(rows, columns=SENSITIVITY_COLUMNS)
    # Most sensitive first: the layer that costs the most by itself, then the one whose
    # exclusion recovers the most (the all-but figures differ little when there are many layers).
    table = table.sort_values(
        ["metric_only_this_quantized", "metric_all_but_this_quantized"], ascending=[True, False]
    ).reset_index(drop=True)
    table.attrs["metric"] = "eval_fn" if calibrated.eval_fn else "output_sqnr_db"
    table.attrs["metric_fp32"] = baseline
    table.attrs["eval_calls"] = calibrated.eval_calls
    return table


def sensitivity(
    model: nn.Module,
    calib_data: Any,
    eval_fn: Callable[[nn.Module], float] | None = None,
    config: QuantConfig | str | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    on_layer: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Per-layer sensitivity of ``model`` to quantization (one row per quantized layer).

    Columns: ``metric_only_this_quantized`` (only that layer quantized),
    ``metric_all_but_this_quantized`` (every layer but that one), ``drop_only_this``
    (FP32 metric minus the first; with ``eval_fn``), ``output_cosine_only_this``.
    Without ``eval_fn`` the metric is the model output's SQNR (dB) against FP32.
    Sorted most sensitive first. Calibrates once and calls ``eval_fn`` 2 x layers + 1 times;
    ``on_layer(done, total)``, when given, is called as the layers are measured.
    ``table.attrs`` holds the metric's name, its FP32 value and the number of eval calls.
    Plot it with :func:`workbench.analysis.sensitivity_plots.sensitivity_chart`.
    """
    calibrated = CalibratedModel(model, calib_data, config, eval_fn, num_batches, progress)
    return sensitivity_table(calibrated, progress, on_layer)
