"""Pareto view across quantization runs: metric (higher is better) against model size and,
when measured, ONNX Runtime latency (both lower is better)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

PARETO_COLUMNS = ["run", "metric", "size_bytes", "latency_ms", "pareto_optimal"]


def _row(name: str, run: Any) -> dict[str, Any]:
    if isinstance(run, Mapping):
        return {
            "run": str(run.get("run", name)),
            "metric": run.get("metric"),
            "size_bytes": run.get("size_bytes"),
            "latency_ms": run.get("latency_ms"),
        }
    summary = run.report.summary
    latency = run.extras.get("latency_ms") if hasattr(run, "extras") else None
    return {
        "run": name,
        "metric": summary.get("metric_quantized", summary.get("model_output_sqnr_db")),
        "size_bytes": summary["quantized_bytes"],
        "latency_ms": latency,
    }


def dominates(a: pd.Series, b: pd.Series, use_latency: bool) -> bool:
    """``a`` is at least as good as ``b`` everywhere and strictly better somewhere."""
    better_or_equal = [a.metric >= b.metric, a.size_bytes <= b.size_bytes]
    strictly = [a.metric > b.metric, a.size_bytes < b.size_bytes]
    if use_latency:
        better_or_equal.append(a.latency_ms <= b.latency_ms)
        strictly.append(a.latency_ms < b.latency_ms)
    return all(better_or_equal) and any(strictly)


def pareto_table(runs: Mapping[str, Any] | Iterable[Any]) -> pd.DataFrame:
    """One row per run with ``pareto_optimal`` marking the non-dominated ones.

    ``runs`` is a mapping name -> QuantResult (or dict with ``metric``, ``size_bytes`` and
    optionally ``latency_ms``), or an iterable of such dicts with a ``run`` key. Latency enters
    the comparison only when every run has it. A run without a metric (NaN / None) is listed
    but never Pareto-optimal.
    """
    items = runs.items() if isinstance(runs, Mapping) else ((str(i), r) for i, r in enumerate(runs))
    table = pd.DataFrame([_row(name, run) for name, run in items], columns=PARETO_COLUMNS[:-1])
    if table.empty:
        return pd.DataFrame(columns=PARETO_COLUMNS)
    table["metric"] = table["metric"].astype(float)
    table["size_bytes"] = table["size_bytes"].astype("int64")
    table["latency_ms"] = table["latency_ms"].astype(float)
    use_latency = bool(table["latency_ms"].notna().all())
    # a run without a metric cannot be compared: it is never optimal and dominates nothing
    measured = table["metric"].notna()
    table["pareto_optimal"] = [
        bool(measured[index])
        and not any(
            dominates(other, row, use_latency)
            for other_index, other in table.iterrows()
            if measured[other_index]
        )
        for index, row in table.iterrows()
    ]
    return table


def pareto_chart(table: pd.DataFrame, metric_label: str = "metric"):
    """Metric against size; Pareto-optimal runs highlighted and joined by the frontier line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    size_kib = table["size_bytes"] / 1024
    optimal = table["pareto_optimal"].to_numpy(dtype=bool)
    ax.scatter(size_kib[~optimal], table["metric"][~optimal], color="#999999", label="dominated")
    ax.scatter(size_kib[optimal], table["metric"][optimal], color="#d62728", label="Pareto-optimal")
    frontier = table[optimal].sort_values("size_bytes")
    ax.plot(frontier["size_bytes"] / 1024, frontier["metric"], color="#d62728", lw=1)
    for _, row in table.iterrows():
        note = row["run"]
        if not np.isnan(row["latency_ms"]):
            note += f" ({row['latency_ms']:.2f} ms)"
        ax.annotate(note, (row["size_bytes"] / 1024, row["metric"]), fontsize=7)
    ax.set_xlabel("model size (KiB)")
    ax.set_ylabel(metric_label)
    ax.set_title("Runs: metric against size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig
