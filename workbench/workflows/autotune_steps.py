"""Steps of ``wb.autotune``'s search (a mixin of its ``_Search``): the FP32 model measured
first, the diagnosis that orders the methods, the rules that skip a candidate (a layout
already slower than the best run), the layouts the next stages start from, and the final
choice, timed side by side.
"""

from __future__ import annotations

import math
import time
import warnings

import pandas as pd

from workbench.analysis.diagnosis import (
    depthwise_convs,
    input_channel_ranges,
    input_outliers,
    weight_error_dominates,
)
from workbench.engine.calibration.eval_metric import measure_metric
from workbench.errors import ConfigError
from workbench.workflows.autotune_result import (
    TABLE_COLUMNS,
    AutotuneResult,
    objective_key,
    select_best,
)
from workbench.workflows.autotune_space import (
    Candidate,
    Diagnosis,
    layout_label,
)

# Two files measured within this fraction of each other may be in either order: a layout is
# only skipped when it is slower than the best run by more than this, and the final choice
# is made by timing the runs within it side by side.
LATENCY_NOISE = 0.25
INTERRUPTED_WARNING = "wb.autotune interrupted"


class SearchSteps:
    """The search's first and last steps and its skip rules; the state is the ``_Search``'s
    own."""

    def _skip_reason(self, candidate: Candidate) -> str | None:
        """Why ``candidate`` cannot beat the best run on the objective (or was tried)."""
        if candidate.config in self.tried_configs:
            return f"same config as {self.tried_configs[candidate.config]!r}"
        best = select_best(self._frame(), self.objective)
        if best is None:
            return None
        if candidate.layout == self._layout_of(best["candidate"]):
            return (
                f"same layout as {best['candidate']!r}, which meets max_drop: observers and "
                "methods change the file's values, not its kernels or bytes"
            )
        return self._layout_worse(candidate)

    def _layout_worse(self, candidate: Candidate) -> str | None:
        """Why the candidate's layout, measured, cannot beat the best run; None when it can
        (or is not measured yet). Latency counts as worse only beyond the timing noise."""
        best = select_best(self._frame(), self.objective)
        known = self.layout_keys.get(candidate.layout)
        if best is None or known is None:
            return None
        best_key = objective_key(best, self.objective)
        key, first = known
        noise = LATENCY_NOISE if self.objective == "latency" else 0.0
        if key > best_key * (1.0 + noise) or (noise == 0.0 and key >= best_key):
            what = "ms" if self.objective == "latency" else "file bytes"
            return (
                f"its layout ({layout_label(candidate.config)}) measured {key:.4g} {what} with "
                f"{first!r}, worse than {best['candidate']!r} ({best_key:.4g}), which meets "
                "max_drop: it cannot win"
            )
        return None

    def _layout_of(self, name: str) -> tuple | None:
        for row in self.rows:
            if row["candidate"] == name:
                return row["_layout"]
        return None

    # before and after ----------------------------------------------------------------------
    def _measure_fp32(self) -> None:
        from workbench.runtime.latency_meter import SideBySideLatency
        from workbench.runtime.onnx_export import export_fp32_onnx

        self.evaluations += 1
        self.metric_fp32 = measure_metric(self.eval_fn, self.original, "the FP32 model")
        path = export_fp32_onnx(self.original, self.workdir / "fp32.onnx", self.example_input)
        self.fp32_file_bytes = path.stat().st_size
        if self.latency_fn is not None:
            self.fp32_latency_ms = float(self.latency_fn(path))
            if not (math.isfinite(self.fp32_latency_ms) and self.fp32_latency_ms > 0):
                raise ConfigError(
                    f"latency_fn returned {self.fp32_latency_ms} ms for the FP32 file; it must "
                    "return a latency in ms > 0"
                )
        else:
            self.meter = SideBySideLatency(path, self.example_input, self.threads)
            self.fp32_latency_ms = self.meter(path).fp32_latency_ms

    def _open_layout_bases(self, best_metric: bool = False) -> list[Candidate]:
        """One candidate per measured layout that has no run within max_drop, best on the
        objective first (those that cannot win are skipped in ``_try``, with the reason):
        the layout's first candidate, or (``best_metric``) its one with the smallest drop."""
        frame = self._frame()
        tried = frame[frame["drop"].notna()]
        met = set(frame.loc[frame["meets_max_drop"].eq(True), "_layout"])
        bases: dict[tuple, tuple[float, float, Candidate]] = {}
        for _, row in tried.iterrows():
            layout = row["_layout"]
            if layout in met or layout not in self.layout_keys:
                continue
            candidate = Candidate(row["candidate"], row["stage"], row["_config"], row["why"])
            drop = float(row["drop"])
            known = bases.get(layout)
            if known is None or (best_metric and drop < known[1]):
                bases[layout] = (self.layout_keys[layout][0], drop, candidate)
        ordered = sorted(bases.values(), key=lambda item: item[0])
        return [candidate for _, _, candidate in ordered]

    def _diagnose(self) -> Diagnosis:
        ranges = input_channel_ranges(self.original, self.batches)
        # the first report of a layout with static inputs shows weight and input error apart
        static = [
            layers
            for config, layers in self.first_layers
            if config.activation is not None and not config.dynamic
        ]
        reports = static or [layers for _, layers in self.first_layers]
        dominated = bool(reports) and weight_error_dominates(reports[0])
        return Diagnosis(
            outliers=input_outliers(ranges),
            depthwise=tuple(depthwise_convs(self.original)),
            weight_dominated=dominated,
            has_linear=not ranges.empty,
        )

    def _set_metric(self, result, metric: float) -> None:
        summary = result.report.summary
        summary["metric_fp32"] = self.metric_fp32
        summary["metric_quantized"] = metric
        summary["metric_drop"] = self.metric_fp32 - metric
        summary["metric_name"] = getattr(self.eval_fn, "__name__", None)

    def _finish(self, interrupted: bool) -> AutotuneResult:
        frame = self._frame()
        running = frame["status"].eq("running")
        frame.loc[running, "status"] = "not run"
        frame.loc[running, "reason"] = "interrupted"
        final = None
        if not interrupted:  # after Ctrl-C the user wants the answer now, not a re-timing
            try:
                final = self._final_timing(frame)
            except KeyboardInterrupt:
                interrupted = True
                self.stopped_because = "interrupted (KeyboardInterrupt) in the final timing"
                warnings.warn(
                    f"{INTERRUPTED_WARNING}: the final side-by-side timing is left out",
                    UserWarning,
                    stacklevel=3,
                )
        best = select_best(frame, self.objective)
        budget_met = best is not None
        if best is None and frame["drop"].notna().any():
            tried = frame[frame["drop"].notna()]
            best = tried.loc[tried["drop"].astype(float).idxmin()]
        best_result = None
        if best is not None:
            frame.loc[frame["candidate"] == best["candidate"], "status"] = "best"
            best_result = self.results.get(best["candidate"])
        if not budget_met and not interrupted:
            warnings.warn(
                f"wb.autotune: no candidate meets max_drop={self.max_drop:g}"
                + (
                    f" (the smallest drop, {float(best['drop']):.4g}, is returned)"
                    if best is not None
                    else ""
                )
                + "; raise max_drop, widen the budget, or try QAT",
                UserWarning,
                stacklevel=3,
            )
        table = frame[TABLE_COLUMNS].reset_index(drop=True)
        result = AutotuneResult(
            best=best_result,
            table=table,
            objective=self.objective,
            max_drop=self.max_drop,
            metric_fp32=self.metric_fp32,
            budget_met=budget_met,
            interrupted=interrupted,
            stopped_because=self.stopped_because,
            diagnosis=self.diagnosis.describe() if self.diagnosis else None,
            fp32_latency_ms=self.fp32_latency_ms,
            fp32_file_bytes=self.fp32_file_bytes,
            evaluations=self.evaluations,
            seconds=time.perf_counter() - self.started,
            final_timing=final,
            example_input=self.example_input,
        )
        result.attach_to_report()
        return result

    def _final_timing(self, frame: pd.DataFrame) -> pd.DataFrame | None:
        """Time the runs within the noise of the fastest side by side in one run; the p50s
        of that run decide (``final_latency_ms``)."""
        if self.objective != "latency" or self.meter is None:
            return None
        finalists = {name: path for name, path in self.files.items() if name in self.results}
        if len(finalists) < 2:
            return None
        timings = self.meter.side_by_side(finalists)
        rows = []
        for name, timing in timings.items():
            index = frame.index[frame["candidate"] == name]
            frame.loc[index, "latency_ms"] = timing.latency_ms
            frame.loc[index, "fp32_latency_ms"] = timing.fp32_latency_ms
            frame.loc[index, "latency_vs_fp32"] = timing.latency_vs_fp32
            frame.loc[index, "reason"] = "timed again beside the other finalists"
            rows.append(
                {
                    "candidate": name,
                    "latency_ms": timing.latency_ms,
                    "fp32_latency_ms": timing.fp32_latency_ms,
                }
            )
        return pd.DataFrame(rows)
