"""Accuracy-driven mixed precision: keep the fewest, most sensitive layers in higher precision.

Over 400 lines: one search (rank, grow, prune) with its two entry points and the QAT hook;
its steps share the search state and the config building.

1. Calibrate once and rank the layers by sensitivity (``workflows/sensitivity.py``).
2. Keep the top-k layers in higher precision (FP32, or 8-bit when the config is below 8 bits),
   k = 0, 1, 2, ..., until the metric drop against FP32 is within ``max_drop``; each step is
   the model it would return (the kept layers go into ``config.overrides`` or ``exclude``, so
   the quantizers around them follow), prepared, calibrated and measured.
3. Try the kept layers again one at a time, least sensitive first, and leave out those the
   budget does not need. No step within budget: the best one, a warning, ``budget_met`` False.

``keep_most_sensitive_fp32`` keeps a fixed number of the most sensitive layers FP32 instead
(and, with ``max_drop``, searches the rest as above). ``wb.qat(..., max_drop=,
keep_most_sensitive=)`` runs one of them first (``search_for_training``) and trains the model
with the precisions it chose.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from numbers import Integral
from typing import Any

import pandas as pd
from torch import nn

from workbench.engine.calibration.batches import iter_batches
from workbench.engine.calibration.calibrate import resolve_config
from workbench.engine.calibration.eval_metric import check_eval_fn, check_search
from workbench.engine.capture.modules import ROOT_NAME
from workbench.engine.config import QuantConfig
from workbench.errors import ConfigError
from workbench.workflows.precision_search import (
    NO_ASSIGNMENT_WARNING,
    calibrated_result,
    search_kept_layers,
    set_reasons,
    stale_table_error,
)
from workbench.workflows.ptq import report_batches
from workbench.workflows.result import QuantResult
from workbench.workflows.sensitivity import CalibratedModel
from workbench.workflows.sensitivity import sensitivity as sensitivity_report


def auto_mixed_precision(
    model: nn.Module,
    calib_data: Any,
    eval_fn: Callable[[nn.Module], float],
    max_drop: float = 0.5,
    config: QuantConfig | str | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    report_data: Any = None,
) -> QuantResult:
    """Quantize ``model`` keeping the fewest most sensitive layers in higher precision so that
    ``eval_fn`` drops by at most ``max_drop`` against FP32.

    Returns a QuantResult whose report lists the layers kept (and why) and has two extra
    tables: ``Sensitivity`` and ``Mixed-precision search`` (layers kept vs metric). The search
    is judged by ``eval_fn`` (measure it on held-out data); ``report_data`` (held-out batches)
    is where the report's per-layer errors are measured, by default the calibration batches.
    """
    check_search(eval_fn, max_drop, "auto_mixed_precision")
    held_out = report_batches(report_data)
    return search_kept_layers(
        model, calib_data, eval_fn, max_drop, config, num_batches, progress, {}, held_out
    )


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
    report_data: Any = None,
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
    ``report_data``: held-out batches for the report's per-layer errors, as in ``wb.ptq``.
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
    held_out = report_batches(report_data)
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
            raise stale_table_error(name)
    ranks = {name: rank for rank, name in enumerate(sensitivity["layer"], start=1)}
    reasons = {
        name: f"kept FP32: sensitivity rank {ranks[name]} of {len(sensitivity)}" for name in kept
    }
    kept_config = replace(
        config, exclude=tuple(config.exclude) + tuple(n for n in kept if n not in config.exclude)
    )
    if max_drop is not None:
        result = search_kept_layers(
            model, batches, eval_fn, max_drop, kept_config, None, progress, reasons, held_out
        )
        searched = result.report.summary["kept_higher_precision"]
        title = "Sensitivity (all layers)"
    else:
        result = _ptq(
            model, batches, kept_config, eval_fn, metric_fp32, progress, reasons, held_out
        )
        searched, title = [], "Sensitivity"
    result.report.extra_tables[title] = sensitivity
    result.report.summary["kept_higher_precision"] = list(kept) + list(searched)
    return result


def check_training_search(
    eval_fn: Any, max_drop: float | None, keep_most_sensitive: Any, caller: str
) -> bool:
    """The search options of ``wb.qat`` (``max_drop`` and ``keep_most_sensitive``), checked
    before any data is read; whether they ask for a search."""
    if max_drop is not None:
        check_search(eval_fn, max_drop, f"{caller} with max_drop")
    if isinstance(keep_most_sensitive, bool) or not isinstance(keep_most_sensitive, Integral):
        raise ConfigError(
            "keep_most_sensitive must be an int (the number of layers kept FP32), got "
            f"{type(keep_most_sensitive).__name__} {keep_most_sensitive!r}"
        )
    if keep_most_sensitive < 0:
        raise ConfigError(
            f"keep_most_sensitive must be >= 0 (the number of layers kept FP32), got "
            f"{keep_most_sensitive}"
        )
    return max_drop is not None or keep_most_sensitive > 0


def search_for_training(
    model: nn.Module,
    batches: list[Any],
    config: QuantConfig,
    eval_fn: Callable[[nn.Module], float] | None,
    max_drop: float | None,
    keep_most_sensitive: int,
    sensitivity: pd.DataFrame | None,
    progress: bool,
) -> QuantResult:
    """The PTQ search whose per-layer precisions QAT trains with: ``keep_most_sensitive_fp32``
    when ``keep_most_sensitive`` > 0 (with ``max_drop``, the rest searched), else
    ``auto_mixed_precision``. The search's own warning that PTQ cannot meet the budget is
    left out: training is what comes next, and QAT's summary says whether it met it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_ASSIGNMENT_WARNING, category=UserWarning)
        if keep_most_sensitive > 0:
            return keep_most_sensitive_fp32(
                model,
                batches,
                keep_most_sensitive,
                config,
                eval_fn,
                sensitivity,
                None,
                progress,
                max_drop,
            )
        return search_kept_layers(model, batches, eval_fn, max_drop, config, None, progress, {})


def kept_layer_notes(search: QuantResult) -> dict[str, str]:
    """Why the search kept each of its layers (``kept 8-bit: sensitivity rank ...``)."""
    kept = set(search.report.summary.get("kept_higher_precision", ()))
    return {plan.name: plan.note for plan in search.plans if plan.name in kept}


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


def _ptq(
    model: nn.Module,
    batches: list[Any],
    config: QuantConfig,
    eval_fn: Callable[[nn.Module], float] | None,
    metric_fp32: float | None,
    progress: bool,
    reasons: Mapping[str, str],
    held_out: list[Any] | None,
) -> QuantResult:
    """``wb.ptq``'s steps, with ``reasons`` set on the plans before the report is built
    (``metric_fp32``: ``eval_fn`` of the FP32 model when already measured)."""
    calibrated = CalibratedModel(
        model, batches, config, None, None, progress, "wb.keep_most_sensitive_fp32"
    )
    set_reasons(calibrated.plans, reasons)
    return calibrated_result(calibrated, calibrated.original, eval_fn, metric_fp32, held_out)
