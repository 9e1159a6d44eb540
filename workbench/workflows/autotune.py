"""Accuracy-driven autotune: the fastest (or smallest) exported model within ``max_drop``.

``wb.autotune`` tries the candidates of ``autotune_space`` stage by stage (presets; observers;
the methods the first report calls for; per-layer precision from the sensitivity ranking).
Each candidate is ``wb.ptq`` of the model with its config, measured with ``eval_fn``; a
candidate within ``max_drop`` of FP32 (or the first of its layout) is exported and its file
timed on ONNX Runtime beside the FP32 file (``runtime.latency_meter``). What is reused across
candidates: the calibration batches (read once), the FP32 metric (measured once), the FP32 file
and session, the diagnosis, and each layout's latency and size (methods change values, not
kernels: a candidate of a layout measured slower than the best run is skipped, with the
reason in the table). The search stops when the budget (evaluations of ``eval_fn``, seconds)
is spent; Ctrl-C (KeyboardInterrupt) returns what it has. The best run's latency is timed again
side by side with every run that was within the noise of it, and the fastest of that run wins.

Over 400 lines: one search loop whose steps (try, skip, measure, keep, finish) share its state.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from workbench.engine.calibration.batches import iter_batches, model_inputs
from workbench.engine.calibration.eval_metric import check_search, measure_metric
from workbench.engine.capture.model_copy import user_model_copy
from workbench.engine.config import QuantConfig
from workbench.errors import ConfigError, WorkbenchError, first_line
from workbench.workflows.autotune_budget import Budget, resolve_budget
from workbench.workflows.autotune_result import (
    TABLE_COLUMNS,
    AutotuneResult,
    objective_key,
    select_best,
)
from workbench.workflows.autotune_space import (
    LATENCY_PRESETS,
    SIZE_PRESETS,
    Candidate,
    Diagnosis,
    layout_label,
    method_candidates,
    method_cost,
    observer_candidates,
    per_layer_candidates,
    preset_candidates,
)
from workbench.workflows.autotune_steps import INTERRUPTED_WARNING, LATENCY_NOISE, SearchSteps
from workbench.workflows.ptq import ptq
from workbench.workflows.sensitivity import sensitivity

OBJECTIVES = ("latency", "size")


def autotune(
    model: nn.Module,
    calib_data: Any,
    eval_fn: Callable[[nn.Module], float],
    max_drop: float = 0.01,
    objective: str = "latency",
    budget: int | Mapping[str, float] | Budget | None = None,
    presets: Sequence[str | QuantConfig] | None = None,
    example_input: Any = None,
    num_batches: int | None = None,
    threads: int | None = 1,
    latency_fn: Callable[[Path], float] | None = None,
    callback: Callable[[pd.DataFrame], None] | None = None,
) -> AutotuneResult:
    """The fastest (``objective="latency"``) or smallest (``"size"``) exported model whose
    ``eval_fn`` metric is within ``max_drop`` of FP32.

    Parameters
    ----------
    model : nn.Module
        Never modified; every candidate quantizes a copy.
    calib_data : DataLoader, iterable of batches, or tensor
        Read once (at most ``num_batches`` batches) and held for every candidate.
    eval_fn : callable
        ``eval_fn(model) -> float``, higher is better, on held-out data: the search's judge.
    max_drop : float
        The largest acceptable drop of the metric against FP32.
    objective : str
        ``latency``: ONNX Runtime CPU p50 of the exported file (timed beside the FP32 file,
        whose p50 gives ``latency_vs_fp32``); ``size``: the exported file's bytes.
    budget : int, dict or Budget
        Evaluations of ``eval_fn`` (the FP32 one included) and / or seconds; default 40
        evaluations. The candidate running when the seconds run out finishes.
    presets : sequence of preset names or QuantConfigs
        Where the search starts (default ``int8``, ``int8-dynamic``, ``int8-weight-only``
        for latency; ``int8``, ``int8-weight-only``, ``int4-weight-g32`` for size); e.g.
        ``("int4-weight", "w4a4")`` to search 4-bit weights only.
    example_input : optional
        The input the files are exported and timed with (default: the first batch's input).
    threads : int or None
        ONNX Runtime intra-op threads for the timing.
    latency_fn : callable, optional
        ``latency_fn(onnx_path) -> ms`` instead of ONNX Runtime here (e.g. a target device);
        it is called on the FP32 file once (for ``latency_vs_fp32``).
    callback : callable, optional
        ``callback(table)`` after every candidate (a live view).

    Returns
    -------
    AutotuneResult
        ``best``: a QuantResult, within ``max_drop`` when ``budget_met``, else the one with
        the smallest drop (with a warning); ``table``: every candidate (config, metric, drop,
        latency, file size, output SQNR, seconds, and why it stopped).
    """
    check_search(eval_fn, max_drop, "wb.autotune")
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; choose 'latency' or 'size'")
    budget = resolve_budget(budget)
    if presets is None:
        presets = LATENCY_PRESETS if objective == "latency" else SIZE_PRESETS
    if isinstance(presets, str | QuantConfig):
        presets = (presets,)
    starts = preset_candidates(presets)  # unknown names raise here, before any work
    if not starts:
        raise ConfigError("presets is empty; pass preset names, e.g. presets=('int8',)")
    if latency_fn is not None and not callable(latency_fn):
        raise ConfigError("latency_fn must be a function latency_fn(onnx_path) -> ms")
    search = _Search(
        model, calib_data, eval_fn, float(max_drop), objective, budget, example_input,
        num_batches, threads, latency_fn, callback,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="workbench-autotune-") as workdir:
        return search.run(starts, Path(workdir))


class _BudgetSpent(Exception):
    """Raised inside the search when the next candidate would exceed the budget."""


class _Search(SearchSteps):
    """The search state: rows so far, each layout's measured objective, the runs kept."""

    def __init__(
        self, model, calib_data, eval_fn, max_drop, objective, budget, example_input,
        num_batches, threads, latency_fn, callback,
    ) -> None:  # fmt: skip
        self.original = user_model_copy(model, "wb.autotune")
        self.batches = list(iter_batches(calib_data, num_batches))
        if example_input is None:
            args, kwargs = model_inputs(self.batches[0])
            example_input = args[0] if len(args) == 1 and not kwargs else (kwargs or args)
        self.example_input = example_input
        self.eval_fn, self.max_drop, self.objective = eval_fn, max_drop, objective
        self.budget, self.threads = budget, threads
        self.latency_fn, self.callback = latency_fn, callback
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}  # kept QuantResults, by candidate name
        self.files: dict[str, Path] = {}
        self.layout_keys: dict[tuple, tuple[float, str]] = {}  # layout -> (key, candidate)
        self.tried_configs: dict[QuantConfig, str] = {}
        self.evaluations = 0
        self.started = time.perf_counter()
        self.metric_fp32 = math.nan
        self.fp32_latency_ms = math.nan
        self.fp32_file_bytes = 0
        self.meter = None
        self.diagnosis: Diagnosis | None = None
        self.first_layers: list[tuple[QuantConfig, pd.DataFrame]] = []  # each layout's first
        self.stopped_because = "every candidate tried"

    # the loop ----------------------------------------------------------------------------
    def run(self, starts: list[Candidate], workdir: Path) -> AutotuneResult:
        self.workdir = workdir
        interrupted = False
        try:
            self._measure_fp32()
            self._run_all(starts)
            self._run_stage(self._open_layout_bases(), observer_candidates)
            self.diagnosis = self._diagnose()
            methods = [
                candidate
                for base in self._open_layout_bases(best_metric=True)
                for candidate in method_candidates(base, self.diagnosis)
            ]
            self._run_all(sorted(methods, key=method_cost))  # stable: fastest layout first
            for base in self._open_layout_bases(best_metric=True):
                self._per_layer(base)
        except _BudgetSpent:
            pass
        except KeyboardInterrupt:
            interrupted = True
            self.stopped_because = "interrupted (KeyboardInterrupt)"
            warnings.warn(
                f"{INTERRUPTED_WARNING}: returning the {len(self.rows)} candidate(s) tried so "
                "far and the best run among them",
                UserWarning,
                stacklevel=3,
            )
        return self._finish(interrupted)

    def _run_all(self, candidates: list[Candidate]) -> None:
        for index, candidate in enumerate(candidates):
            try:
                self._try(candidate)
            except _BudgetSpent:
                for rest in candidates[index:]:
                    self._row(rest, "not run", f"budget spent: {self.stopped_because}")
                raise

    def _run_stage(self, bases: list[Candidate], expand) -> None:
        candidates = [candidate for base in bases for candidate in expand(base)]
        self._run_all(candidates)

    def _per_layer(self, base: Candidate) -> None:
        """Keep base's most sensitive layers higher, one more at a time, until one run meets
        the budget or keeping more can no longer win."""
        worse = self._layout_worse(base)
        if worse is not None:
            name = f"{base.name} + most sensitive kept higher"
            self._row(
                Candidate(name, "per-layer", base.config, "per-layer precision"), "skipped", worse
            )
            return
        self._check_budget()
        ranking = sensitivity(self.original, self.batches, None, base.config, progress=False)
        candidates = per_layer_candidates(base, list(ranking["layer"]), len(ranking))
        for index, candidate in enumerate(candidates):
            try:
                row = self._try(candidate)
            except _BudgetSpent:
                for rest in candidates[index:]:
                    self._row(rest, "not run", f"budget spent: {self.stopped_because}")
                raise
            if row["status"] == "meets max_drop":
                break
            worse = self._layout_worse(candidate)
            if worse is not None:
                for rest in candidates[index + 1 :]:
                    self._row(
                        rest, "skipped", f"keeping more layers higher only adds work; {worse}"
                    )
                break

    # one candidate -------------------------------------------------------------------------
    def _check_budget(self) -> None:
        spent = self.budget.evaluations is not None and self.evaluations >= self.budget.evaluations
        if spent:
            self.stopped_because = f"{self.evaluations} evaluations"
            raise _BudgetSpent
        elapsed = time.perf_counter() - self.started
        if self.budget.seconds is not None and elapsed >= self.budget.seconds:
            self.stopped_because = f"{elapsed:.0f} s of {self.budget.seconds:g} s"
            raise _BudgetSpent

    def _try(self, candidate: Candidate) -> dict[str, Any]:
        reason = self._skip_reason(candidate)
        if reason is not None:
            return self._row(candidate, "skipped", reason)
        self._check_budget()
        self.tried_configs[candidate.config] = candidate.name
        started = time.perf_counter()
        row = self._row(candidate, "running", "")
        try:
            self._evaluate(candidate, row)
        except WorkbenchError as exc:
            row["status"], row["reason"] = "failed", first_line(exc)
        except Exception as exc:  # a method that fails on this model: the search goes on
            row["status"], row["reason"] = "failed", f"{type(exc).__name__}: {first_line(exc)}"
        row["seconds"] = time.perf_counter() - started
        row["evaluations"] = self.evaluations
        self._notify()
        return row

    def _evaluate(self, candidate: Candidate, row: dict[str, Any]) -> None:
        result = ptq(self.original, self.batches, candidate.config, progress=False)
        self.evaluations += 1
        metric = measure_metric(self.eval_fn, result.model, f"candidate {candidate.name!r}")
        drop = self.metric_fp32 - metric
        meets = drop <= self.max_drop
        summary = result.report.summary
        row.update(
            metric=metric,
            drop=drop,
            meets_max_drop=meets,
            output_sqnr_db=summary.get("model_output_sqnr_db"),
            output_cosine=summary.get("model_output_cosine"),
            status="meets max_drop" if meets else "misses max_drop",
            reason="" if meets else f"drop {drop:.4g} > max_drop {self.max_drop:g}",
        )
        self._set_metric(result, metric)
        measured = candidate.layout in self.layout_keys
        if not measured:
            self.first_layers.append((candidate.config, result.report.layers))
        if meets or not measured:
            self._measure_file(candidate, result, row)
        else:
            first = self.layout_keys[candidate.layout][1]
            row["reason"] += f"; not exported (its layout was timed with {first!r})"
        self._keep(candidate, result, row)

    def _measure_file(self, candidate: Candidate, result, row: dict[str, Any]) -> None:
        path = self.workdir / f"candidate-{len(self.rows)}.onnx"
        result.export_onnx(path, self.example_input, check_fusion=False)
        row["file_bytes"] = path.stat().st_size
        latency_ms, fp32_ms = self._latency(path)
        row.update(
            latency_ms=latency_ms, fp32_latency_ms=fp32_ms, latency_vs_fp32=latency_ms / fp32_ms
        )
        key = objective_key(row, self.objective)
        known = self.layout_keys.get(candidate.layout)
        if known is None or key < known[0]:
            self.layout_keys[candidate.layout] = (key, candidate.name)
        if row["meets_max_drop"]:
            self.files[candidate.name] = path
        else:
            path.unlink()

    def _latency(self, path: Path) -> tuple[float, float]:
        if self.latency_fn is not None:
            return float(self.latency_fn(path)), self.fp32_latency_ms
        timing = self.meter(path)
        return timing.latency_ms, timing.fp32_latency_ms

    def _keep(self, candidate: Candidate, result, row: dict[str, Any]) -> None:
        """Keep the QuantResults that can still be returned: runs within the noise of the
        best on the objective, and the smallest drop while nothing meets max_drop."""
        self.results[candidate.name] = result
        frame = self._frame()
        best = select_best(frame, self.objective)
        keep = set()
        if best is None:
            tried = frame[frame["drop"].notna()]
            keep.add(tried.loc[tried["drop"].astype(float).idxmin(), "candidate"])
        else:
            limit = objective_key(best, self.objective) * (1.0 + LATENCY_NOISE)
            meets = frame[frame["meets_max_drop"].eq(True)]
            for _, other in meets.iterrows():
                if objective_key(other, self.objective) <= limit:
                    keep.add(other["candidate"])
        for name in list(self.results):
            if name not in keep:
                del self.results[name]
                path = self.files.pop(name, None)
                if path is not None:
                    path.unlink(missing_ok=True)

    def _row(self, candidate: Candidate, status: str, reason: str) -> dict[str, Any]:
        row = {column: None for column in TABLE_COLUMNS}
        row.update(
            candidate=candidate.name,
            stage=candidate.stage,
            why=candidate.why,
            layout=layout_label(candidate.config),
            config=candidate.config.describe(),
            status=status,
            reason=reason,
            meets_max_drop=False,
            evaluations=self.evaluations,
            _layout=candidate.layout,
            _config=candidate.config,
        )
        self.rows.append(row)
        if status != "running":
            self._notify()
        return row

    def _frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=[*TABLE_COLUMNS, "_layout", "_config"])

    def _notify(self) -> None:
        if self.callback is not None:
            self.callback(self._frame()[TABLE_COLUMNS])
