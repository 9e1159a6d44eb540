"""Post-training quantization: the engine's steps, then the report."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch
from torch import nn

from workbench.analysis.layer_errors import measure_layer_errors
from workbench.analysis.layer_table import layer_table
from workbench.analysis.report import Report, build_summary, metric_name_of
from workbench.analysis.sites import SITES_TITLE, activation_quantizers, site_table
from workbench.analysis.storage import storage_table
from workbench.engine.algorithms.refine import refine_quantized_model
from workbench.engine.calibration.batches import iter_batches
from workbench.engine.calibration.block_progress import block_progress
from workbench.engine.calibration.calibrate import (
    calibrate,
    finish_calibration,
    needs_activation_calibration,
    prepare_model,
    resolve_config,
)
from workbench.engine.calibration.eval_metric import check_eval_fn, measure_metric
from workbench.engine.calibration.probe import first_tokens, probe_batch
from workbench.engine.capture.model_copy import user_model_copy
from workbench.engine.capture.modules import tensor_bytes
from workbench.engine.capture.prepare import LayerPlan
from workbench.engine.config import QuantConfig
from workbench.engine.placement.layers import iter_quantized_layers
from workbench.engine.training.distributed import (
    broadcast_model,
    distributed_job,
    shard_loader,
    start_from_rank0,
    unwrap_ddp,
)
from workbench.errors import CalibrationError, ConfigError
from workbench.workflows.result import QuantResult, finished_result
from workbench.workflows.stages import StageClock

REPORT_BATCHES = 8
SITE_SQNR_BATCHES = 1  # one more forward of the quantized model, hooked at every quantizer
# a model with this many bytes of weights gets its per-layer errors measured on the first
# report batch only (a bounded cost: each batch runs the FP32 and the quantized model)
REPORT_SAMPLE_MODEL_BYTES = 1024**3
REPORT_WEIGHT_ROWS = 256  # and its weight errors on this many rows of each larger weight
REPORT_SAMPLE_TOKENS = 16  # and, for batches of token ids, their first tokens only


def build_report(
    original: nn.Module,
    fp32_model: nn.Module,
    quantized: nn.Module,
    plans: list[LayerPlan],
    config: QuantConfig,
    report_batches: list[Any],
    eval_fn: Callable[[nn.Module], float] | None = None,
    metric_fp32: float | None = None,
    held_out: list[Any] | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> Report:
    """The report of a calibrated model: layer table, storage, summary with ``eval_fn``'s
    metric of ``original`` (``metric_fp32`` when already measured) and of ``quantized``.
    ``original`` is the eval-mode copy of the user's model (``user_model_copy``), never the
    user's model itself: ``eval_fn`` may run it in training mode. The per-layer errors are
    measured on ``held_out`` (``report_batches(report_data)``) when given, else on
    ``report_batches`` (the first calibration batches); ``summary["layer_errors_on"]`` says
    which. ``max_batches`` bounds the batches measured, token batches to their first
    ``REPORT_SAMPLE_TOKENS`` tokens (``layer_errors_sample`` says so), with a progress bar
    per block when ``progress``."""
    source = "calib_data" if held_out is None else "report_data"
    batches = report_batches if held_out is None else held_out
    available = len(batches)
    if max_batches is not None:  # and of token batches, their first tokens
        whole = batches[:max_batches]
        batches = [first_tokens(batch, REPORT_SAMPLE_TOKENS) for batch in whole]
        cut = any(b is not w for b, w in zip(batches, whole, strict=True))
    with block_progress(
        quantized,
        "report (blocks)",
        2 * len(batches),
        progress and max_batches is not None,
        [fp32_model],
    ):
        measured, model_stats = measure_layer_errors(fp32_model, quantized, batches, source)
    weight_rows = None if max_batches is None else REPORT_WEIGHT_ROWS
    layers = layer_table(quantized, plans, measured, weight_rows)
    storage = storage_table(original, quantized, plans)
    metric_quantized = None
    if eval_fn is not None:
        if metric_fp32 is None:
            metric_fp32 = measure_metric(eval_fn, original, "the FP32 model")
        metric_quantized = measure_metric(eval_fn, quantized, "the quantized model")
    summary = build_summary(
        layers,
        storage,
        model_stats,
        config.describe(),
        metric_fp32,
        metric_quantized,
        metric_name_of(eval_fn),
    )
    summary["ptq_methods"] = config.ptq_methods()
    summary["layer_errors_on"] = source
    summary["layer_errors_batches"] = len(batches)
    if max_batches is not None:
        summary["layer_errors_sample"] = (
            f"first {len(batches)} of {available} batches"
            + (f" (their first {REPORT_SAMPLE_TOKENS} tokens)" if cut else "")
            + f", weight errors on "
            f"{REPORT_WEIGHT_ROWS} evenly spaced rows of larger weights (a model of "
            f"{tensor_bytes(original) / 1024**3:.1f} GiB: bounded cost)"
        )
    # the sites' own rounding needs a forward only where activations are quantized
    quantizes_activations = bool(activation_quantizers(quantized))
    sites = site_table(quantized, batches[:SITE_SQNR_BATCHES] if quantizes_activations else [])
    extra = {SITES_TITLE: sites} if len(sites) else {}
    return Report(layers, storage, summary, model=quantized, extra_tables=extra)


def report_batches(report_data: Any) -> list[Any] | None:
    """The held-out batches the report's per-layer errors are measured on: the first
    ``REPORT_BATCHES`` of ``report_data``, read (and checked) before calibration; None
    without it (the first calibration batches are used)."""
    if report_data is None:
        return None
    return list(iter_batches(report_data, REPORT_BATCHES, what="report_data"))


def ptq(
    model: nn.Module,
    calib_data: Any = None,
    config: QuantConfig | str | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    report_data: Any = None,
) -> QuantResult:
    """Post-training quantization of ``model``.

    Parameters
    ----------
    model : nn.Module
        Any model with Linear / Conv layers. It is deep-copied and never modified.
    calib_data : DataLoader, iterable of batches, or tensor
        Batches are tensors, ``(inputs, targets)`` tuples, or dicts of keyword inputs.
        Optional with ``activation_mode="dynamic"`` (``wb.ptq(model, config="int8-dynamic")``
        or ``wb.ptq(model, config)``): there it only feeds the report's per-layer errors.
    config : QuantConfig or preset name
        Default: ``QuantConfig.preset("int8")``.
    eval_fn : callable, optional
        ``eval_fn(model) -> float`` (e.g. accuracy); measured for FP32 and quantized.
    num_batches : int, optional
        Use at most this many calibration batches (per process in a distributed job).
    progress : bool
        Show a progress bar.
    report_data : DataLoader, iterable of batches, or tensor, optional
        Held-out batches (not calibration batches) on which the report measures the
        per-layer errors (its first 8 batches); default: the first calibration batches.
    """
    if isinstance(calib_data, QuantConfig) and config is None:  # wb.ptq(model, config)
        calib_data, config = None, calib_data
    config = resolve_config(config)
    check_eval_fn(eval_fn, "wb.ptq")
    held_out = report_batches(report_data)
    if calib_data is None:
        return ptq_without_data(model, config, eval_fn, held_out)
    clock = StageClock()
    with distributed_job() as job:  # each process calibrates on its shard
        # the engine's models read the user's tensors instead of copies, except in a
        # distributed job, which writes rank 0's weights into them
        share = job is None
        with clock.stage("copy"):
            reference = user_model_copy(unwrap_ddp(model), "wb.ptq", share_weights=share)
        if job is not None:
            calib_data, progress = shard_loader(calib_data, job), progress and job.writes_files
        head, batches = _calibration_stream(calib_data, num_batches)
        first = head[0] if job is None else start_from_rank0(reference, head[0], job)
        # a large model's passes that only find layers run on its first tokens
        probe = probe_batch(first, tensor_bytes(reference)) if job is None else first
        with clock.stage("prepare"):
            fp32_model, prepared, plans = prepare_model(
                reference, probe, config, head, share_weights=share
            )
        limit = _report_batch_limit(reference)  # large models: bars per block too
        with clock.stage("calibration"), _calibration_blocks(prepared, batches, limit, progress):
            reached = calibrate(prepared, batches, progress, job, probe=probe)
            finish_calibration(prepared, plans, reached)
            prepared.eval()
        with clock.stage("refinement"):
            refine_quantized_model(fp32_model, prepared, plans, config, head, progress)
        if job is not None:  # refinements ran on each shard's batches: rank 0's everywhere
            broadcast_model(prepared, job)
        with clock.stage("report"):
            report = build_report(
                reference,
                fp32_model,
                prepared,
                plans,
                config,
                head,
                eval_fn,
                held_out=held_out,
                max_batches=limit,
                progress=progress,
            )
        clock.add_to(report.summary)
        return finished_result(prepared, fp32_model, report, config, plans, "ptq", head[0], job)


def ptq_without_data(
    model: nn.Module,
    config: QuantConfig,
    eval_fn: Callable[[nn.Module], float] | None = None,
    held_out: list[Any] | None = None,
) -> QuantResult:
    """Dynamic quantization needs no calibration: weights from the model, activation scales
    from each input at run time. The report's errors are measured on ``held_out``
    (``report_data``) when given, else not at all (NaN)."""
    if not config.dynamic:
        raise CalibrationError(
            "calib_data is None; pass a DataLoader or a list of input tensors to calibrate the "
            "activation scales, or use config='int8-dynamic' (scales from each input, no data)"
        )
    if config.ptq_methods():
        raise ConfigError(
            f"{', '.join(config.ptq_methods())} run(s) on calibration data; pass calib_data "
            "or drop them from the config"
        )
    reference = user_model_copy(unwrap_ddp(model), "wb.ptq", share_weights=True)
    fp32_model, prepared, plans = prepare_model(reference, None, config, share_weights=True)
    finish_calibration(prepared, plans, {name for name, _ in iter_quantized_layers(prepared)})
    prepared.eval()
    refine_quantized_model(fp32_model, prepared, plans, config, [], progress=False)
    report = build_report(
        reference, fp32_model, prepared, plans, config, [], eval_fn, held_out=held_out
    )
    return QuantResult(prepared, fp32_model, report, config, plans, method="ptq")


def _calibration_blocks(
    prepared: nn.Module, batches: _CalibrationBatches, limit: int | None, progress: bool
):
    """A bar per block over the calibration passes of a large model (``limit`` not None)."""
    # weight-only: one pass finds the layers called
    passes = batches.expected if needs_activation_calibration(prepared) else 1
    return block_progress(prepared, "calibrating (blocks)", passes, progress and limit is not None)


def _report_batch_limit(model: nn.Module) -> int | None:
    """1 for a model of ``REPORT_SAMPLE_MODEL_BYTES`` or more (its report measures the first
    batch only), else None (every report batch)."""
    return 1 if tensor_bytes(model) >= REPORT_SAMPLE_MODEL_BYTES else None


def _calibration_stream(calib_data: Any, num_batches: int | None) -> tuple[list[Any], Any]:
    """The first ``REPORT_BATCHES`` batches (kept: BN folding, the report) and all the batches,
    streamed after them, so that a whole training DataLoader need not fit in memory."""
    stream = iter_batches(calib_data, num_batches)
    head = list(islice(stream, REPORT_BATCHES))
    return head, _CalibrationBatches(head, stream, _expected_batches(calib_data, num_batches))


class _CalibrationBatches:
    """The kept first batches, then the rest of the stream; sized when the data is."""

    def __init__(self, head: list[Any], rest: Iterator[Any], expected: int | None) -> None:
        self.head, self.rest, self.expected = head, rest, expected

    def __iter__(self) -> Iterator[Any]:
        yield from self.head
        yield from self.rest

    def __len__(self) -> int:
        if self.expected is None:
            raise TypeError("the number of calibration batches is not known in advance")
        return self.expected


def _expected_batches(calib_data: Any, num_batches: int | None) -> int | None:
    """Number of batches for the progress bar, when the data knows its length."""
    if isinstance(calib_data, torch.Tensor | Mapping):
        return 1
    try:
        count = len(calib_data)
    except TypeError:
        return num_batches
    return count if num_batches is None else min(count, num_batches)
