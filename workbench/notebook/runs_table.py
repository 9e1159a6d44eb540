"""The panel's runs table: every run of the session side by side, and metric against size."""

from __future__ import annotations

from typing import Any

import pandas as pd

from workbench.engine.config import QuantConfig

RUN_COLUMNS = [
    "run",
    "method",
    "preset",
    "weights",
    "activations",
    "observer",
    "fp32_layers",
    "metric_fp32",
    "metric",
    "size_bytes",
    "compression",
    "mean_sqnr_db",
    "model_sqnr_db",
    "fp32_ms",
    "int8_ms",
    "speedup",
]


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

    @property
    def frame(self) -> pd.DataFrame:
        """The runs as a DataFrame (columns ``RUN_COLUMNS``)."""
        return pd.DataFrame(self._rows, columns=RUN_COLUMNS)

    def plot(self):
        """Scatter of metric (or model output SQNR when no eval_fn) against size, one labelled
        point per run; None before the first run. A ``matplotlib.figure.Figure``, no pyplot."""
        if not self._rows:
            return None
        from matplotlib.figure import Figure

        frame = self.frame
        has_metric = frame["metric"].notna().all()
        column, label = (
            ("metric", "metric") if has_metric else ("model_sqnr_db", "output SQNR (dB)")
        )
        size_kib = frame["size_bytes"].astype(float) / 1024
        values = pd.to_numeric(frame[column], errors="coerce")
        figure = Figure(figsize=(5.5, 3.0))
        ax = figure.add_subplot()
        ax.scatter(size_kib, values, color="#1f77b4")
        for run, x, y in zip(frame["run"], size_kib, values, strict=True):
            ax.annotate(f"#{run}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if has_metric and frame["metric_fp32"].notna().any():
            ax.axhline(float(frame["metric_fp32"].iloc[-1]), color="#999999", ls="--", lw=1)
        ax.set_xlabel("size (KiB)")
        ax.set_ylabel(label)
        ax.set_title("Runs: metric against size (FP32 metric dashed)", fontsize=9)
        figure.tight_layout()
        return figure
