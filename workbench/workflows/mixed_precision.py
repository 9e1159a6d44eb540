"""Accuracy-driven mixed precision: keep the fewest, most sensitive layers in higher precision.

1. Calibrate once and rank the layers by sensitivity (``workflows/sensitivity.py``).
2. Keep the top-k layers in higher precision (FP32, or 8-bit when the config is below 8 bits),
   k = 0, 1, 2, ..., until the metric drop against FP32 is within ``max_drop``.
The 8-bit fallback is calibrated once too (one pass of its own), never per layer.

``keep_most_sensitive_fp32`` keeps a fixed number of the most sensitive layers FP32 instead
(and, with ``max_drop``, searches the rest as above).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from itertools import islice
from numbers import Integral
from typing import Any

import pandas as pd
from torch import nn

from workbench.engine.batches import iter_batches
from workbench.engine.calibrate import resolve_config
from workbench.engine.config import QuantConfig
from workbench.engine.eval_metric import check_eval_fn, check_search, measure_metric
from workbench.engine.layers import iter_quantized_layers
from workbench.engine.modules import ROOT_NAME, set_submodule
from workbench.engine.prepare import FP32
from workbench.engine.switches import quantize_only
from workbench.errors import ConfigError
from workbench.workflows.input_signature import input_signature
from workbench.workflows.ptq import REPORT_BATCHES, build_report
from workbench.workflows.result import QuantResult
from workbench.workflows.sensitivity import CalibratedModel, sensitivity_table
from workbench.workflows.sensitivity import sensitivity as sensitivity_report


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
    check_search(eval_fn, max_drop, "auto_mixed_precision")
    return _search(model, calib_data, eval_fn, max_drop, config, num_batches, progress, {})


def keep_most_sensitive_fp32(
    model: nn.Module,
    calib_data: Any,
    count: int,
    config: QuantConfig | str | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    sensitivity: pd.DataFrame | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    max_drop: float | None = None,
) -> QuantResult:
    """PTQ of ``model`` with its ``count`` most sensitive layers kept FP32.

    The ranking is ``sensitivity`` (a table of ``wb.sensitivity`` for this model and config),
    computed with ``wb.sensitivity`` when not given. The result is ``wb.ptq`` with those layers
    added to ``config.exclude``; each one's ``reason`` in ``report.layers`` gives its rank, the
    ranking joins the report as ``Sensitivity`` and ``summary["kept_higher_precision"]`` names
    them, most sensitive first. With ``max_drop`` (needs ``eval_fn``), the other layers are then
    searched as :func:`auto_mixed_precision` does: its ranking of the rest is ``Sensitivity``,
    this one ``Sensitivity (all layers)``, and the layers it keeps follow in the summary.
    The calibration batches are read once and held in memory, as ``wb.sensitivity`` does.
    """
    config = resolve_config(config)
    if max_drop is not None:
        check_search(eval_fn, max_drop, "keep_most_sensitive_fp32 with max_drop")
    check_eval_fn(eval_fn, "keep_most_sensitive_fp32")
    if isinstance(count, bool) or not isinstance(count, Integral):
        raise ConfigError(
            f"count must be an int (the number of layers kept FP32), got "
            f"{type(count).__name__} {count!r}"
        )
    # read once: the ranking and the quantization see the same batches (a generator too)
    batches = list(iter_batches(calib_data, num_batches))
    metric_fp32 = None
    if sensitivity is None:
        sensitivity = sensitivity_report(model, batches, eval_fn, config, None, progress)
        if eval_fn is not None:
            metric_fp32 = sensitivity.attrs["metric_fp32"]
    kept = _most_sensitive(sensitivity, count)
    names = {name or ROOT_NAME for name, _ in getattr(model, "_orig_mod", model).named_modules()}
    for name in kept:
        if name not in names:
            raise _stale_table_error(name)
    ranks = {name: rank for rank, name in enumerate(sensitivity["layer"], start=1)}
    reasons = {
        name: f"kept FP32: sensitivity rank {ranks[name]} of {len(sensitivity)}" for name in kept
    }
    kept_config = replace(
        config, exclude=tuple(config.exclude) + tuple(n for n in kept if n not in config.exclude)
    )
    if max_drop is not None:
        result = _search(model, batches, eval_fn, max_drop, kept_config, None, progress, reasons)
        searched = result.report.summary["kept_higher_precision"]
        title = "Sensitivity (all layers)"
    else:
        result = _ptq(model, batches, kept_config, eval_fn, metric_fp32, progress, reasons)
        searched, title = [], "Sensitivity"
    result.report.extra_tables[title] = sensitivity
    result.report.summary["kept_higher_precision"] = list(kept) + list(searched)
    return result


def _most_sensitive(sensitivity: pd.DataFrame, count: int) -> list[str]:
    """The first ``count`` layers of a sensitivity table; at least one layer stays quantized."""
    if not isinstance(sensitivity, pd.DataFrame) or "layer" not in sensitivity:
        raise ConfigError(
            "sensitivity must be the table wb.sensitivity returns (a DataFrame with a 'layer' "
            "column); pass it, or leave sensitivity unset to compute it"
        )
    if not 0 <= count < len(sensitivity):
        raise ConfigError(
            f"count must be between 0 and {len(sensitivity) - 1} (the ranking has "
            f"{len(sensitivity)} layers and one at least stays quantized), got {count}"
        )
    return list(sensitivity["layer"].head(count))


def _set_reasons(plans: list, reasons: Mapping[str, str]) -> None:
    """Give the layers kept FP32 by the caller their reason, before the report is built."""
    for name, reason in reasons.items():
        plan = next((p for p in plans if p.name == name), None)
        if plan is None or plan.status != FP32:
            raise _stale_table_error(name)
        plan.note = reason


def _stale_table_error(name: str) -> ConfigError:
    return ConfigError(
        f"the sensitivity table names layer {name!r}, which this model does not keep "
        "FP32 under the config; pass the table wb.sensitivity computed for this model "
        "and config"
    )


def _ptq(
    model: nn.Module,
    batches: list[Any],
    config: QuantConfig,
    eval_fn: Callable[[nn.Module], float] | None,
    metric_fp32: float | None,
    progress: bool,
    reasons: Mapping[str, str],
) -> QuantResult:
    """``wb.ptq``'s steps, with ``reasons`` set on the plans before the report is built
    (``metric_fp32``: ``eval_fn`` of the FP32 model when already measured)."""
    calibrated = CalibratedModel(
        model, batches, config, None, None, progress, "wb.keep_most_sensitive_fp32"
    )
    _set_reasons(calibrated.plans, reasons)
    report = build_report(
        calibrated.original,
        calibrated.fp32_model,
        calibrated.model,
        calibrated.plans,
        calibrated.config,
        list(islice(calibrated.batches, REPORT_BATCHES)),
        eval_fn,
        metric_fp32,
    )
    return QuantResult(
        calibrated.model,
        calibrated.fp32_model,
        report,
        calibrated.config,
        calibrated.plans,
        method="ptq",
        input_signature=input_signature(calibrated.batches[0]),
    )


def _search(
    model: nn.Module,
    calib_data: Any,
    eval_fn: Callable[[nn.Module], float],
    max_drop: float,
    config: QuantConfig | str | None,
    num_batches: int | None,
    progress: bool,
    reasons: Mapping[str, str],
) -> QuantResult:
    """The mixed-precision search; ``reasons`` of layers the config already keeps FP32 are set
    on the plans before the report is built."""
    low = CalibratedModel(
        model, calib_data, config, eval_fn, num_batches, progress, "wb.auto_mixed_precision"
    )
    sens = sensitivity_table(low, progress)
    metric_fp32 = sens.attrs["metric_fp32"]
    fallback_config = higher_precision_config(low.config)
    high = None
    if fallback_config is not None:
        high = CalibratedModel(
            model, low.batches, fallback_config, None, None, progress, "wb.auto_mixed_precision"
        )
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
        metric = measure_metric(eval_fn, low.model, f"the model with {k} layer(s) kept")
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
            plan.status, plan.note = FP32, f"kept FP32: {why}"
        else:
            plan.weight_bits = fallback_config.weight.bits
            plan.note = f"kept {plan.weight_bits}-bit: {why}"
    _set_reasons(low.plans, reasons)
    search = pd.DataFrame(trajectory)
    report = build_report(
        low.original,
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
    return QuantResult(
        mixed,
        low.fp32_model,
        report,
        low.config,
        low.plans,
        method="ptq",
        input_signature=input_signature(low.batches[0]),
    )


def _apply(model: nn.Module, low_layers: dict, fallback_layers: dict, kept: list[str]) -> None:
    """Put every layer in place: ``kept`` ones as their fallback, the rest quantized."""
    for name in low_layers:
        set_submodule(model, name, fallback_layers[name] if name in kept else low_layers[name])
    quantize_only(model, low_layers)
