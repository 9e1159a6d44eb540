"""Quantization-aware training: PTQ calibration, training with fake quantization, the report.

What is trained is what is exported: weights and activations are fake-quantized (STE) exactly
as the exported INT8 model computes them, and BatchNorm is folded into its conv (from the
start by default; see ``engine/training/live_bn.py`` for ``freeze_bn_after``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import pandas as pd
import torch
from torch import nn

from workbench.analysis.qat_report import QATReport
from workbench.analysis.report import Report
from workbench.engine.algorithms.refine import check_training_config
from workbench.engine.calibration.batches import (
    epoch_batches,
    iter_batches,
    loss_target,
    move_batch,
    take_first_batches,
)
from workbench.engine.calibration.calibrate import (
    calibrate,
    finish_calibration,
    prepare_model,
    resolve_config,
)
from workbench.engine.calibration.eval_metric import check_eval_fn
from workbench.engine.capture.model_copy import user_model_copy
from workbench.engine.capture.prepare import LayerPlan
from workbench.engine.config import QuantConfig
from workbench.engine.free_cpus import threads_on_free_cpus
from workbench.engine.quantizers.qat import enable_qat, finish_qat
from workbench.engine.training.distributed import (
    Job,
    check_equal_steps,
    distributed_job,
    reshuffled_epochs,
    shard_loader,
    start_from_rank0,
    unwrap_ddp,
)
from workbench.engine.training.live_bn import unfold_batchnorms
from workbench.engine.training.options import (
    TrainingOptions,
    build_optimizer,
    check_loss,
    check_loss_fn,
    resolve_device,
)
from workbench.engine.training.train import TrainingLog, train_qat
from workbench.errors import ConfigError
from workbench.workflows.mixed_precision import (
    check_training_search,
    kept_layer_notes,
    search_for_training,
)
from workbench.workflows.ptq import REPORT_BATCHES, build_report, report_batches
from workbench.workflows.result import QuantResult, finished_result

CALIB_BATCHES = 8
HISTORY_COLUMNS = ["step", "epoch", "loss", "metric"]


def qat(
    model: nn.Module,
    train_data: Any,
    config: QuantConfig | str | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    epochs: int = 1,
    lr: float = 1e-4,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    calib_data: Any = None,
    device: str | torch.device | None = None,
    learn_scales: bool = False,
    freeze_bn_after: int = 0,
    progress: bool = True,
    max_drop: float | None = None,
    keep_most_sensitive: int = 0,
    sensitivity: pd.DataFrame | None = None,
    report_data: Any = None,
) -> QuantResult:
    """Quantization-aware training of a copy of ``model``; ``model`` itself is untouched.

    Parameters
    ----------
    model : nn.Module with Linear / Conv layers (BatchNorm after a conv is folded into it).
    train_data : ``(inputs, targets)`` batches (``loss_fn(model(inputs), targets)``) or dicts
        of keyword inputs (``loss_fn(model(**batch), batch)``); iterated once per epoch.
    config : QuantConfig or preset name (default ``"int8"``).
    loss_fn : ``loss_fn(output, target) -> scalar tensor``, e.g. ``nn.CrossEntropyLoss()``.
    epochs, lr, optimizer, device, learn_scales, freeze_bn_after : how it trains
        (:class:`~workbench.engine.training.options.TrainingOptions`): passes over ``train_data``;
        learning rate; an optimizer class or factory called as ``optimizer(param_groups,
        lr=lr)`` (default Adam; not an instance: the trained model is a copy); ``"cuda"`` or
        the CPU (the result is on the CPU); learn every scale with LSQ; training steps during
        which BatchNorm statistics keep updating before BN is folded for good (0: from the
        start, as PTQ does).
    eval_fn : ``eval_fn(model) -> float``, run after every epoch and for the report.
    calib_data : batches for the starting PTQ (default: the first 8 of ``train_data``).
    max_drop, keep_most_sensitive, sensitivity : train with mixed precision: first the PTQ
        search of ``wb.auto_mixed_precision`` (needs ``eval_fn``) / of
        ``wb.keep_most_sensitive_fp32`` (ranked by the ``wb.sensitivity`` table when given),
        then training with the precisions it chose; ``summary["budget_met"]`` says whether
        the trained model is within ``max_drop``.
    report_data : held-out batches the report measures the per-layer errors on (its first 8).
    progress : show progress bars.

    Returns
    -------
    QuantResult
        ``method="qat"``, ``history`` (one row per step), ``report`` with PTQ's tables plus
        ``plot_training()`` and ``plot_scales()``. A KeyboardInterrupt during training returns
        the result so far, with a warning.
    """
    config = resolve_config(config)
    check_training_config(config, "wb.qat")
    check_loss_fn(loss_fn)
    options = TrainingOptions(epochs, lr, optimizer, device, learn_scales, freeze_bn_after)
    check_eval_fn(eval_fn, "wb.qat")
    searching = check_training_search(eval_fn, max_drop, keep_most_sensitive, "wb.qat")
    held_out = report_batches(report_data)
    device = resolve_device(device)
    with distributed_job(device) as job:  # one data shard per process, DDP
        check_one_process(job, searching)
        data = read_training_batches(model, train_data, calib_data, epochs, progress, job)
        source = user_model_copy(unwrap_ddp(model), "wb.qat").to("cpu")  # the FP32 reference
        search = None
        if searching:  # the PTQ search first: its per-layer precisions are what trains
            search = search_for_training(
                source, data.calib, config, eval_fn, max_drop, keep_most_sensitive,
                sensitivity, data.progress,
            )  # fmt: skip
            config = search.config
        fp32_model, prepared, plans = calibrate_for_training(source, data, config, options, job)
        prepared, log = train(prepared, data, loss_fn, options, device, eval_fn, job)
        built = (source, fp32_model, prepared, plans, config, data, eval_fn, held_out)
        report = qat_report(*built, search=search, max_drop=max_drop)
        report = QATReport(report, history_frame(log), training_summary(log, options))
        extras = {"interrupted": log.interrupted, "bn_frozen_at_step": log.bn_frozen_at_step}
        return finished_result(
            prepared, fp32_model, report, config, plans, "qat", data.calib[0], job, extras=extras
        )


def check_one_process(job: Job | None, searching: bool) -> None:
    """The mixed-precision search runs in one process, not in a distributed job."""
    if job is not None and searching:
        raise ConfigError(
            "wb.qat searches mixed precision (max_drop, keep_most_sensitive) in one "
            "process only; run wb.auto_mixed_precision once and pass its result's config "
            "to wb.qat"
        )


@dataclass
class TrainingBatches:
    """What QAT reads: the first batches (kept), the epochs' batches, the calibration
    batches, the steps per epoch when known, and whether this process shows progress."""

    first: list[Any]
    of_epoch: Callable[[], Iterator]
    calib: list[Any]
    steps_per_epoch: int | None
    progress: bool


def read_training_batches(
    model: nn.Module, train_data: Any, calib_data: Any, epochs: int, progress: bool, job: Job | None
) -> TrainingBatches:
    """The batches of one process (its shard in a distributed job); the first batch's form
    ((inputs, targets) or a dict, ``engine.calibration.batches``' rule) checked now."""
    if job is not None:
        train_data, progress = shard_loader(train_data, job), progress and job.writes_files
        calib_data = None if calib_data is None else shard_loader(calib_data, job)
    first = take_first_batches(train_data, CALIB_BATCHES)
    loss_target(first[0], unwrap_ddp(model))
    of_epoch = epoch_batches(train_data, first, epochs)
    calib = first if calib_data is None else list(iter_batches(calib_data))
    steps = _length(train_data)
    if job is not None:
        of_epoch = reshuffled_epochs(of_epoch, train_data)
        check_equal_steps(steps, job)
    return TrainingBatches(first, of_epoch, calib, steps, progress)


def calibrate_for_training(
    source: nn.Module,
    data: TrainingBatches,
    config: QuantConfig,
    options: TrainingOptions,
    job: Job | None,
) -> tuple[nn.Module, nn.Module, list[LayerPlan]]:
    """PTQ's start (placement from rank 0's first batch, calibration), then the quantizers
    in training mode (live BatchNorm while ``freeze_bn_after`` steps run)."""
    first = data.calib[0] if job is None else start_from_rank0(source, data.calib[0], job)
    fp32_model, prepared, plans = prepare_model(source, first, config)
    reached = calibrate(prepared, data.calib, data.progress, job)
    finish_calibration(prepared, plans, reached)
    if options.freeze_bn_after > 0:
        unfold_batchnorms(prepared, source, plans)
    enable_qat(prepared, options.learn_scales)
    return fp32_model, prepared, plans


def train(
    prepared: nn.Module,
    data: TrainingBatches,
    loss_fn: Callable,
    options: TrainingOptions,
    device: torch.device,
    eval_fn: Callable[[nn.Module], float] | None,
    job: Job | None,
) -> tuple[nn.Module, TrainingLog]:
    """Train on ``device``; the trained model back on the CPU with its quantizers fixed. A
    KeyboardInterrupt keeps the steps done, with a warning."""
    prepared.to(device)
    optimizer = build_optimizer(options.optimizer, prepared, options.lr)
    check_loss(prepared, move_batch(data.first[0], device), loss_fn)
    with threads_on_free_cpus():  # on a busy machine, fewer threads train faster
        prepared, log = train_qat(
            prepared,
            data.of_epoch,
            loss_fn,
            optimizer,
            options.epochs,
            device,
            eval_fn,
            options.freeze_bn_after,
            data.steps_per_epoch,
            data.progress,
            job,
        )
    if log.interrupted:
        warnings.warn(
            f"QAT was interrupted after {len(log.steps)} step(s) "
            f"({len(log.epochs)} of {options.epochs} epoch(s) completed); returning the model "
            "trained so far (the input model is untouched)",
            RuntimeWarning,
            stacklevel=3,
        )
    return finish_qat(prepared).to("cpu"), log


def qat_report(
    source: nn.Module,
    fp32_model: nn.Module,
    prepared: nn.Module,
    plans: list[LayerPlan],
    config: QuantConfig,
    data: TrainingBatches,
    eval_fn: Callable[[nn.Module], float] | None,
    held_out: list[Any] | None,
    search: QuantResult | None = None,
    max_drop: float | None = None,
) -> Report:
    """PTQ's report of the trained model, its errors on the first calibration batches (or
    ``held_out``); with the mixed-precision ``search``, why it kept each layer and its
    tables."""
    if search is not None:
        note_kept_layers(plans, search)
    first = list(islice(data.calib, REPORT_BATCHES))
    report = build_report(
        source, fp32_model, prepared, plans, config, first, eval_fn, held_out=held_out
    )
    if search is not None:
        carry_search(report, search, max_drop)
    return report


def note_kept_layers(plans: list[LayerPlan], search: QuantResult) -> None:
    """Why the search kept each layer, in its plan, as the search's own report says."""
    notes = kept_layer_notes(search)
    for plan in plans:
        plan.note = notes.get(plan.name, plan.note)


def carry_search(report: Report, search: QuantResult, max_drop: float | None) -> None:
    """The PTQ search's tables and kept layers in the QAT report; with ``max_drop``,
    ``budget_met`` of the trained model (a warning when it is over budget)."""
    report.extra_tables.update(search.report.extra_tables)
    report.summary["kept_higher_precision"] = list(search.report.summary["kept_higher_precision"])
    if max_drop is None:
        return
    report.summary["max_drop"] = float(max_drop)
    report.summary["search_budget_met"] = bool(search.report.summary["budget_met"])
    drop = report.summary["metric_drop"]
    report.summary["budget_met"] = bool(drop <= max_drop)
    if not report.summary["budget_met"]:
        warnings.warn(
            f"wb.qat: the trained model drops {drop:.4g}, over max_drop={max_drop} (PTQ with "
            f"the search's {len(report.summary['kept_higher_precision'])} kept layer(s) "
            f"dropped {search.report.summary['metric_drop']:.4g}); train longer or raise "
            "max_drop",
            UserWarning,
            stacklevel=4,  # wb.qat's caller (qat -> qat_report -> here)
        )


def history_frame(log: TrainingLog) -> pd.DataFrame:
    """One row per completed step: step, epoch, loss, metric (epoch ends), learned scales."""
    history = pd.DataFrame(log.steps)
    for column in HISTORY_COLUMNS:
        if column not in history:
            history[column] = pd.Series(dtype="float64")
    scales = [c for c in history.columns if c not in HISTORY_COLUMNS]
    history = history[HISTORY_COLUMNS + scales]
    history["metric"] = history["metric"].astype("float64")
    return history.astype({"step": "int64", "epoch": "int64"})


def training_summary(log: TrainingLog, options: TrainingOptions) -> dict[str, Any]:
    return {
        "method": "qat",
        "qat_steps": len(log.steps),
        "qat_epochs": options.epochs,
        "qat_epochs_completed": len(log.epochs),
        "qat_interrupted": log.interrupted,
        "qat_final_loss": log.steps[-1]["loss"] if log.steps else None,
        "qat_learn_scales": options.learn_scales,
        "qat_bn_frozen_at_step": log.bn_frozen_at_step,
    }


def _length(data: Any) -> int | None:
    if isinstance(data, dict):
        return 1
    try:
        return len(data)
    except TypeError:
        return None
