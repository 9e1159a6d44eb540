"""Accuracy-driven mixed precision: keep the fewest, most sensitive layers in higher precision.

1. Calibrate once and rank the layers by sensitivity (``workflows/sensitivity.py``).
2. Keep the top-k layers in higher precision (FP32, or 8-bit when the config is below 8 bits),
   k = 0, 1, 2, ..., until the metric drop against FP32 is within ``max_drop``.
The 8-bit fallback is calibrated once too (one pass of its own), never per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from itertools import islice
from typing import Any

import pandas as pd
from torch import nn

from workbench.engine.bn_fold import set_submodule
from workbench.engine.config import QuantConfig
from workbench.engine.layers import iter_quantized_layers
from workbench.engine.prepare import FP32
from workbench.engine.switches import quantize_only
from workbench.errors import ConfigError
from workbench.workflows.ptq import REPORT_BATCHES, build_report
from workbench.workflows.result import QuantResult
from workbench.workflows.sensitivity import CalibratedModel, sensitivity_table


def higher_precision_config(config: QuantConfig) -> QuantConfig | None:
    """The 8-bit version of a config below 8 bits, or None when FP32 is the fallback."""
    low_weight = config.weight.bits < 8
    low_act = config.activation is not None and config.activation.bits < 8
    if not (low_weight or low_act):
        return None
    weight = replace(config.weight, bits=8)
    activation = replace(config.activation, bits=8) if config.activation else None
    return replace(config, weight=weight, activation=activation)


def auto_mixed_precision(
    model: nn.Module,
    calib_data: Any,
    eval_fn: Callable[[nn.Module], float],
    max_drop: float = 0.5,
    config: QuantConfig | str | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> QuantResult:
    """Quantize ``model`` keeping the fewest most sensitive layers in higher precision so that
    ``eval_fn`` drops by at most ``max_drop`` against FP32.

    Returns a QuantResult whose report lists the layers kept (and why) and has two extra
    tables: ``Sensitivity`` and ``Mixed-precision search`` (layers kept vs metric).
    """
    if eval_fn is None or not callable(eval_fn):
        raise ConfigError("auto_mixed_precision needs eval_fn(model) -> float, higher is better")
    if max_drop < 0:
        raise ConfigError(f"max_drop must be >= 0, got {max_drop}")
    low = CalibratedModel(model, calib_data, config, eval_fn, num_batches, progress)
    sens = sensitivity_table(low, progress)
    metric_fp32 = sens.attrs["metric_fp32"]
    fallback_config = higher_precision_config(low.config)
    high = None
    if fallback_config is not None:
        high = CalibratedModel(model, low.batches, fallback_config, None, None, progress)
    low_layers = dict(iter_quantized_layers(low.model))
    # what a kept layer becomes: its 8-bit twin, or its FP32 module; the search measures
    # exactly the model it returns
    if high is not None:
        fallback_layers = dict(iter_quantized_layers(high.model))
    else:
        fallback_layers = {name: layer.layer for name, layer in low_layers.items()}

    order = list(sens["layer"])
    trajectory = []
    kept: list[str] = []
    for k in range(len(order) + 1):
        kept = order[:k]
        _apply(low.model, low_layers, fallback_layers, kept)
        metric = float(eval_fn(low.model))
        drop = metric_fp32 - metric
        trajectory.append(
            {"layers_kept": k, "kept": ", ".join(kept), "metric": metric, "drop": drop}
        )
        if drop <= max_drop:
            break
    mixed = low.model
    for rank, name in enumerate(kept, start=1):
        plan = next(p for p in low.plans if p.name == name)
        why = f"sensitivity rank {rank}, needed for a drop <= {max_drop}"
        if high is None:
            plan.status, plan.reason = FP32, f"kept FP32: {why}"
        else:
            plan.reason = f"kept {fallback_config.weight.bits}-bit: {why}"
    search = pd.DataFrame(trajectory)
    report = build_report(
        model,
        low.fp32_model,
        mixed,
        low.plans,
        low.config,
        list(islice(low.batches, REPORT_BATCHES)),
        eval_fn,
        metric_fp32,
    )
    report.extra_tables["Sensitivity"] = sens
    report.extra_tables["Mixed-precision search"] = search
    report.summary["kept_higher_precision"] = list(kept)
    report.summary["max_drop"] = float(max_drop)
    return QuantResult(mixed, low.fp32_model, report, low.config, low.plans, method="ptq")


def _apply(model: nn.Module, low_layers: dict, fallback_layers: dict, kept: list[str]) -> None:
    """Put every layer in place: ``kept`` ones as their fallback, the rest quantized."""
    for name in low_layers:
        set_submodule(model, name, fallback_layers[name] if name in kept else low_layers[name])
    quantize_only(model, low_layers)
