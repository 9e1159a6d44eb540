"""The mixed-precision search of ``wb.auto_mixed_precision`` (``mixed_precision.py``): rank the
layers by sensitivity, keep the most sensitive ones in higher precision one more at a time
until the metric drops by at most ``max_drop``, then give back each kept layer the budget does
not need; and the configs that keep layers (FP32, or 8-bit below 8 bits)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

import pandas as pd
from torch import nn

from workbench.engine.calibration.eval_metric import measure_metric
from workbench.engine.capture.prepare import FP32
from workbench.engine.config import QuantConfig
from workbench.engine.quantizers.switches import quantize_only
from workbench.errors import ConfigError
from workbench.workflows.input_signature import input_signature
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


NO_ASSIGNMENT_WARNING = "wb.auto_mixed_precision: no assignment meets"


def set_reasons(plans: list, reasons: Mapping[str, str]) -> None:
    """Give the layers kept FP32 by the caller their reason, before the report is built."""
    for name, reason in reasons.items():
        plan = next((p for p in plans if p.name == name), None)
        if plan is None or plan.status != FP32:
            raise stale_table_error(name)
        plan.note = reason


def stale_table_error(name: str) -> ConfigError:
    return ConfigError(
        f"the sensitivity table names layer {name!r}, which this model does not keep "
        "FP32 under the config; pass the table wb.sensitivity computed for this model "
        "and config"
    )


def kept_config(config: QuantConfig, fallback: QuantConfig | None, kept: list[str]) -> QuantConfig:
    """``config`` with the ``kept`` layers at the fallback's precision (through ``overrides``,
    so the quantizers around them follow) or, without a fallback, in ``exclude`` (FP32)."""
    if fallback is None:
        extra = tuple(name for name in kept if name not in config.exclude)
        return replace(config, exclude=tuple(config.exclude) + extra)
    schemes = {"weight": fallback.weight, "activation": fallback.activation}
    overrides = dict(config.overrides)
    for name in kept:
        overrides.pop(name, None)
        overrides[name] = dict(schemes)  # last: it wins over the config's own patterns
    return replace(config, overrides=overrides)


def search_kept_layers(
    model: nn.Module,
    calib_data: Any,
    eval_fn: Callable[[nn.Module], float],
    max_drop: float,
    config: QuantConfig | str | None,
    num_batches: int | None,
    progress: bool,
    reasons: Mapping[str, str],
    held_out: list[Any] | None = None,
) -> QuantResult:
    """The mixed-precision search; ``reasons`` of layers the config already keeps FP32 are set
    on the plans before the report is built.

    Every step is a model of its own, prepared and calibrated with the kept layers in the
    config (``kept_config``) and measured as returned: keep the most sensitive layers one more
    at a time until the drop is within ``max_drop``, then drop again each kept layer (least
    sensitive first) that the budget does not need. When no step meets the budget, the best
    one is returned with a warning and ``summary["budget_met"] = False``."""
    low = CalibratedModel(
        model, calib_data, config, eval_fn, num_batches, progress, "wb.auto_mixed_precision"
    )
    sens = sensitivity_table(low, progress)
    search = _Search(low, eval_fn, sens.attrs["metric_fp32"], higher_precision_config(low.config))
    order = list(sens["layer"])
    best, best_drop, best_kept = search.grow(order, max_drop)
    budget_met = best_drop <= max_drop
    if budget_met:
        best, best_drop, best_kept = search.shrink(best, best_drop, best_kept, max_drop)
    else:
        warnings.warn(
            f"{NO_ASSIGNMENT_WARNING} max_drop={max_drop} (the best, "
            f"{len(best_kept)} layer(s) kept, drops {best_drop:.4g}); it is returned with "
            "summary['budget_met'] = False: raise max_drop, or try QAT",
            UserWarning,
            stacklevel=3,
        )
    ranks = {name: rank for rank, name in enumerate(order, start=1)}
    for name in best_kept:
        plan = next(p for p in best.plans if p.name == name)
        why = f"sensitivity rank {ranks[name]}, needed for a drop <= {max_drop}"
        kept_as = "FP32" if search.fallback is None else f"{plan.kept_bits}-bit"
        plan.note = f"kept {kept_as}: {why}"
    set_reasons(best.plans, reasons)
    result = calibrated_result(best, low.original, eval_fn, search.metric_fp32, held_out)
    report = result.report
    report.extra_tables["Sensitivity"] = sens
    report.extra_tables["Mixed-precision search"] = pd.DataFrame(search.trajectory)
    report.summary["kept_higher_precision"] = list(best_kept)
    report.summary["max_drop"] = float(max_drop)
    report.summary["budget_met"] = bool(budget_met)
    return result


@dataclass
class _Search:
    """What the search's steps share: the all-quantized model, the metric, the fallback
    precision, and one trajectory row per model measured."""

    low: CalibratedModel
    eval_fn: Callable[[nn.Module], float]
    metric_fp32: float
    fallback: QuantConfig | None
    trajectory: list[dict] = field(default_factory=list)

    def measure(self, kept: list[str], step: str) -> tuple[CalibratedModel, float]:
        """The model with ``kept`` layers kept, calibrated and measured (its drop)."""
        low = self.low
        if kept:
            config = kept_config(low.config, self.fallback, kept)
            candidate = CalibratedModel(
                low.original, low.batches, config, None, None, False, "wb.auto_mixed_precision"
            )
        else:  # the config itself: the model the ranking was measured on, all quantized
            quantize_only(low.model, low.layer_names)
            candidate = low
        what = f"the model with {len(kept)} layer(s) kept"
        drop = self.metric_fp32 - measure_metric(self.eval_fn, candidate.model, what)
        row = {"step": step, "layers_kept": len(kept), "kept": ", ".join(kept)}
        self.trajectory.append(row | {"metric": self.metric_fp32 - drop, "drop": drop})
        return candidate, drop

    def grow(self, order: list[str], max_drop: float):
        """Keep the most sensitive layers one more at a time until the drop is within
        ``max_drop``: the best step (model, drop, kept layers)."""
        best, best_drop, best_kept = None, float("inf"), []
        for k in range(len(order) + 1):
            kept = order[:k]
            candidate, drop = self.measure(kept, "keep" if k else "config")
            if drop < best_drop:
                best, best_drop, best_kept = candidate, drop, kept
            if drop <= max_drop:
                break
        return best, best_drop, best_kept

    def shrink(self, best, best_drop: float, best_kept: list[str], max_drop: float):
        """Drop again each kept layer (least sensitive first) the budget does not need."""
        for name in reversed(list(best_kept)):
            fewer = [n for n in best_kept if n != name]
            candidate, drop = self.measure(fewer, f"drop {name}")
            if drop <= max_drop:
                best, best_drop, best_kept = candidate, drop, fewer
        return best, best_drop, best_kept


def calibrated_result(
    calibrated: CalibratedModel,
    original: nn.Module,
    eval_fn: Callable[[nn.Module], float] | None,
    metric_fp32: float | None,
    held_out: list[Any] | None,
) -> QuantResult:
    """The PTQ result of a calibrated model, its report on the first calibration batches
    (or ``held_out``)."""
    first = list(islice(calibrated.batches, REPORT_BATCHES))
    report = build_report(
        original,
        calibrated.fp32_model,
        calibrated.model,
        calibrated.plans,
        calibrated.config,
        first,
        eval_fn,
        metric_fp32,
        held_out,
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
