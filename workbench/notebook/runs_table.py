"""The panel's runs table: every run of the session side by side, and metric against size.

A run is Pareto-optimal when no other run is at least as good in metric, size and (once every
run is benchmarked) INT8 latency and better in one of them (``wb.pareto_table``).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from workbench.engine.config import QuantConfig
from workbench.notebook import actions

RUN_COLUMNS = [
    "run",
    "method",
    "preset",
    "weights",
    "activations",
    "observer",
    "fp32_layers",
    "kept_by_sensitivity",
    "layer_overrides",
    "metric_fp32",
    "metric",
    "size_bytes",
    "compression",
    "mean_sqnr_db",
    "model_sqnr_db",
    "fp32_ms",
    "int8_ms",
    "speedup",
    "pareto_optimal",
]


# What a reader sees first (latency, speedup and Pareto without scrolling), with units.
DISPLAY_COLUMNS = {
    "run": "Run",
    "method": "Method",
    "weights": "Weights",
    "metric": "Metric",
    "model_sqnr_db": "Model SQNR (dB)",
    "size_kib": "Size (KiB)",
    "compression": "Smaller by",
    "int8_ms": "INT8 (ms)",
    "speedup": "Speedup",
    "pareto_optimal": "Pareto",
    "activations": "Activations",
    "observer": "Observer",
    "fp32_layers": "Kept FP32",
    "layer_overrides": "Per-layer",
}


def overrides_text(config: QuantConfig) -> str:
    """The config's per-layer precisions in short: ``fc1: W8A8, conv: W8Afp32``."""
    parts = []
    for pattern, override in config.overrides.items():
        weight = override.get("weight", config.weight)
        activation = override.get("activation", config.activation)
        bits = activation.bits if activation is not None else "fp32"
        parts.append(f"{pattern}: W{weight.bits}A{bits}")
    return ", ".join(parts)


class RunsTable:
    """One row per successful run: its config, metric, size and (once benchmarked) latency."""

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, method: str, preset: str, config: QuantConfig, summary: dict[str, Any]) -> int:
        """Record a run; returns its number (1, 2, ...)."""
        run = len(self._rows) + 1
        self._rows.append(
            {
                "run": run,
                "method": method.upper(),
                "preset": preset,
                "weights": config.weight.describe(),
                "activations": config.activation.describe() if config.activation else "fp32",
                "observer": config.observer,
                "fp32_layers": ", ".join(config.exclude),
                "kept_by_sensitivity": ", ".join(summary.get("kept_higher_precision", ())),
                "layer_overrides": overrides_text(config),
                "metric_fp32": summary.get("metric_fp32"),
                "metric": summary.get("metric_quantized"),
                "size_bytes": summary["quantized_bytes"],
                "compression": summary["compression_ratio"],
                "mean_sqnr_db": summary.get("mean_output_sqnr_db"),
                "model_sqnr_db": summary.get("model_output_sqnr_db"),
                "fp32_ms": None,
                "int8_ms": None,
                "speedup": None,
            }
        )
        return run

    def set_latency(self, run: int, fp32_ms: float, int8_ms: float) -> None:
        """Record the benchmarked latencies of run ``run``."""
        row = self._rows[run - 1]
        row["fp32_ms"], row["int8_ms"] = float(fp32_ms), float(int8_ms)
        row["speedup"] = float(fp32_ms) / float(int8_ms) if int8_ms else None

    def metric_column(self) -> str:
        """``metric`` when every run has one (an eval_fn was given), else ``model_sqnr_db``."""
        if self._rows and all(row["metric"] is not None for row in self._rows):
            return "metric"
        return "model_sqnr_db"

    @property
    def frame(self) -> pd.DataFrame:
        """The runs as a DataFrame (columns ``RUN_COLUMNS``); ``pareto_optimal`` compares
        the metric (or model output SQNR), size and, when every run has it, INT8 latency."""
        column = self.metric_column()
        optimal = actions.pareto_optimal(
            [
                {
                    "run": row["run"],
                    "metric": row[column],
                    "size_bytes": row["size_bytes"],
                    "latency_ms": row["int8_ms"],
                }
                for row in self._rows
            ]
        )
        rows = [row | {"pareto_optimal": o} for row, o in zip(self._rows, optimal, strict=True)]
        return pd.DataFrame(rows, columns=RUN_COLUMNS)

    def display_frame(self) -> pd.DataFrame:
        """The runs as a reader sees them: the columns of ``DISPLAY_COLUMNS`` (friendly
        headers, sizes in KiB, the ratios as ``3.91x``, the layers kept FP32 by hand and by
        sensitivity together), no metric column when no run has one."""
        frame = self.frame.copy()
        frame["size_kib"] = (frame["size_bytes"].astype(float) / 1024).round(1)
        frame["compression"] = [f"{value:.2f}\u00d7" for value in frame["compression"]]
        frame["speedup"] = [
            f"{value:.2f}\u00d7" if value == value and value is not None else None
            for value in frame["speedup"]
        ]
        frame["pareto_optimal"] = ["\u2605" if flag else "" for flag in frame["pareto_optimal"]]
        kept = [
            ", ".join(part for part in (by_hand, by_rank) if part)
            for by_hand, by_rank in zip(
                frame["fp32_layers"], frame["kept_by_sensitivity"], strict=True
            )
        ]
        frame["fp32_layers"] = kept
        columns = [c for c in DISPLAY_COLUMNS if c != "metric" or frame["metric"].notna().any()]
        return frame[columns].rename(columns=DISPLAY_COLUMNS)

    def plot(self):
        """Scatter of metric (or model output SQNR when no eval_fn) against size, one labelled
        point per run, Pareto-optimal runs in red; None before the first run. A
        ``matplotlib.figure.Figure``, no pyplot."""
        if not self._rows:
            return None
        from matplotlib.figure import Figure

        frame = self.frame
        column = self.metric_column()
        has_metric = column == "metric"
        label = "metric" if has_metric else "output SQNR (dB)"
        size_kib = frame["size_bytes"].astype(float) / 1024
        values = pd.to_numeric(frame[column], errors="coerce")
        optimal = frame["pareto_optimal"].to_numpy(dtype=bool)
        with_latency = bool(frame["int8_ms"].notna().all())
        figure = Figure(figsize=(5.5, 3.0))
        ax = figure.add_subplot()
        reference = [float(frame["metric_fp32"].iloc[-1])] if has_metric else []
        shown = [v for v in [*values.dropna().tolist(), *reference] if v == v]
        if shown:  # a margin around the values, not matplotlib's default (104 for 100 %)
            low, high = min(shown), max(shown)
            pad = max(0.1 * (high - low), 0.01 * max(abs(high), 1.0))
            ax.set_ylim(low - pad, high + pad)
        ax.scatter(size_kib[~optimal], values[~optimal], color="#999999", label="dominated")
        ax.scatter(
            size_kib[optimal],
            values[optimal],
            color="#d62728",
            label="Pareto-optimal" + (" (metric, size, latency)" if with_latency else ""),
        )
        if not with_latency:  # in two dimensions the optimal runs form a frontier
            frontier = frame.assign(x=size_kib, y=values)[optimal].sort_values("x")
            ax.plot(frontier["x"], frontier["y"], color="#d62728", lw=1)
        for run, x, y in zip(frame["run"], size_kib, values, strict=True):
            ax.annotate(
                f"#{run}",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                color="#888888",
                annotation_clip=False,  # "#1" at the edge stays whole
            )
        if has_metric and frame["metric_fp32"].notna().any():
            ax.axhline(float(frame["metric_fp32"].iloc[-1]), color="#999999", ls="--", lw=1)
        ax.set_xlabel("size (KiB)")
        ax.set_ylabel(label)
        dashed = has_metric and frame["metric_fp32"].notna().any()
        ax.set_title("Runs: metric against size" + (" (FP32 metric dashed)" if dashed else ""))
        ax.legend(fontsize=7)
        from workbench.analysis.plots import themed

        themed(figure, ax)
        figure.tight_layout()
        return figure
