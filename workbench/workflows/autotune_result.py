"""What ``wb.autotune`` returns: the best run, the table of every candidate, the choice rule."""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.analysis.pareto import pareto_table

TABLE_COLUMNS = [
    "candidate",
    "stage",
    "why",
    "layout",
    "config",
    "status",
    "reason",
    "metric",
    "drop",
    "meets_max_drop",
    "latency_ms",
    "fp32_latency_ms",
    "latency_vs_fp32",
    "file_bytes",
    "output_sqnr_db",
    "output_cosine",
    "seconds",
    "evaluations",
]
REPORT_TITLE = "Autotune candidates"


def objective_key(row: Any, objective: str) -> float:
    """What the search minimises for one measured row: the file's p50 latency or its bytes.
    (Not the ratio to the FP32 file timed beside it: on a loaded machine the FP32 file's own
    p50 swings more than the integer kernels' do, 2.3x between two runs of the outlier BERT.)"""
    value = row["latency_ms"] if objective == "latency" else row["file_bytes"]
    return math.inf if value is None or pd.isna(value) else float(value)


def select_best(table: pd.DataFrame, objective: str) -> pd.Series | None:
    """The row within max_drop with the smallest objective (ties: the smaller drop, then the
    earlier candidate); None when no measured row meets max_drop."""
    if table.empty:
        return None
    meets = table[table["meets_max_drop"].eq(True)]
    keys = [objective_key(row, objective) for _, row in meets.iterrows()]
    candidates = [
        (key, float(row["drop"]), position)
        for position, ((_, row), key) in enumerate(zip(meets.iterrows(), keys, strict=True))
        if math.isfinite(key)
    ]
    if not candidates:
        return None
    _, _, position = min(candidates)
    return meets.iloc[position]


@dataclass
class AutotuneResult:
    """The search's outcome.

    Attributes
    ----------
    best : QuantResult or None
        The fastest (smallest) run within ``max_drop`` (``budget_met``), else the run with the
        smallest drop; None when no candidate ran. Its report holds the candidates table
        (``Autotune candidates``) and ``summary["autotune"]``.
    table : pandas.DataFrame
        One row per candidate, in the order tried: ``stage`` (preset, observer, method,
        per-layer), ``why`` it was tried, ``layout``, ``config``, ``status`` (best, meets
        max_drop, misses max_drop, skipped, failed, not run) and ``reason``, ``metric``,
        ``drop``, ``latency_ms`` and ``fp32_latency_ms`` (ONNX Runtime p50s of one side by side
        run), ``latency_vs_fp32``, ``file_bytes``, ``output_sqnr_db``, ``seconds`` spent,
        ``evaluations`` of ``eval_fn`` so far.
    budget_met : bool
        Whether ``best`` is within ``max_drop``.
    interrupted : bool
        Whether Ctrl-C stopped the search (the table and best run are those so far).
    stopped_because : str
        Every candidate tried, the budget spent, or the interrupt.
    """

    best: Any
    table: pd.DataFrame
    objective: str
    max_drop: float
    metric_fp32: float
    budget_met: bool
    interrupted: bool
    stopped_because: str
    diagnosis: str | None
    fp32_latency_ms: float
    fp32_file_bytes: int
    evaluations: int
    seconds: float
    final_timing: pd.DataFrame | None = None
    example_input: Any = field(default=None, repr=False)

    @property
    def best_row(self) -> pd.Series | None:
        rows = self.table[self.table["status"] == "best"]
        return None if rows.empty else rows.iloc[0]

    def summary(self) -> dict[str, Any]:
        """The search in a few JSON-safe numbers (also ``best.report.summary["autotune"]``)."""
        row = self.best_row
        summary = {
            "objective": self.objective,
            "max_drop": self.max_drop,
            "metric_fp32": self.metric_fp32,
            "budget_met": self.budget_met,
            "interrupted": self.interrupted,
            "stopped_because": self.stopped_because,
            "candidates_tried": int(self.table["drop"].notna().sum()),
            "candidates_skipped": int((self.table["status"] == "skipped").sum()),
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 3),
            "diagnosis": self.diagnosis,
            "fp32_latency_ms": self.fp32_latency_ms,
            "fp32_file_bytes": self.fp32_file_bytes,
            "best": None,
        }
        if row is not None:
            summary["best"] = {
                key: _plain(row[key])
                for key in (
                    "candidate",
                    "config",
                    "metric",
                    "drop",
                    "latency_ms",
                    "fp32_latency_ms",
                    "latency_vs_fp32",
                    "file_bytes",
                )
            }
        return summary

    def attach_to_report(self) -> None:
        """The candidates table and the summary into the best run's report (its JSON bundle)."""
        if self.best is None:
            return
        self.best.report.extra_tables[REPORT_TITLE] = self.table
        self.best.report.summary["autotune"] = self.summary()

    def pareto(self) -> pd.DataFrame:
        """The exported runs (metric, file bytes, latency) with the Pareto-optimal marked."""
        measured = self.table[self.table["file_bytes"].notna()]
        runs = [
            {
                "run": row["candidate"],
                "metric": row["metric"],
                "size_bytes": int(row["file_bytes"]),
                "latency_ms": row["latency_ms"],
            }
            for _, row in measured.iterrows()
            if row["metric"] is not None and not pd.isna(row["metric"])
        ]
        return pareto_table(runs)

    def plot_pareto(self):
        """Metric against ONNX Runtime latency (or file size) of every exported candidate, the
        ones within max_drop filled, the best one marked."""
        from workbench.analysis.autotune_plot import autotune_chart

        return autotune_chart(self.table, self.metric_fp32, self.max_drop, self.objective)

    def export_onnx(self, path: str | os.PathLike, example_input: Any = None, **options) -> Path:
        """``best.export_onnx`` (default input: the one the search timed with)."""
        if self.best is None:
            from workbench.errors import ConfigError

            raise ConfigError("the search tried no candidate, so there is nothing to export")
        example = self.example_input if example_input is None else example_input
        return self.best.export_onnx(path, example, **options)

    def summary_text(self) -> str:
        lines = [f"Autotune ({self.objective}, max_drop {self.max_drop:g}): {self.stopped_because}"]
        row = self.best_row
        if row is None:
            lines.append("  no run")
        else:
            met = "within max_drop" if self.budget_met else "NOT within max_drop (smallest drop)"
            line = f"  best: {row['candidate']} ({met}), drop {float(row['drop']):.4g}"
            if row["latency_ms"] is not None and not pd.isna(row["latency_ms"]):
                line += (
                    f", {float(row['latency_ms']):.3f} ms vs FP32 "
                    f"{float(row['fp32_latency_ms']):.3f} ms"
                )
            if row["file_bytes"] is not None and not pd.isna(row["file_bytes"]):
                line += f", {int(row['file_bytes']):,} B"
            lines.append(line)
            if self.objective == "latency" and _slower_than_fp32(row):
                lines.append(
                    "  note: the FP32 file ran faster than this run beside it: the integer "
                    "kernels do not pay for their quantize / dequantize steps on this model "
                    "and input size"
                )
        tried = int(self.table["drop"].notna().sum())
        skipped = int((self.table["status"] == "skipped").sum())
        lines.append(
            f"  {tried} tried, {skipped} skipped, {self.evaluations} evaluations, "
            f"{self.seconds:.1f} s"
        )
        if self.diagnosis:
            lines.append(f"  diagnosis: {self.diagnosis}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary_text()

    def _repr_html_(self) -> str:
        lines = "<br>".join(html.escape(line) for line in self.summary_text().splitlines())
        table = self.table.to_html(index=False, escape=True, float_format="{:,.4g}".format)
        return f"<div><b>{lines}</b></div>" + table


def _slower_than_fp32(row: pd.Series) -> bool:
    ratio = row["latency_vs_fp32"]
    return ratio is not None and not pd.isna(ratio) and float(ratio) > 1.0


def _plain(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value
