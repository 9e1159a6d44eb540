"""The Report attached to every quantization result: tables, summary, plots, rich display."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from workbench.atomic_file import atomic_path
from workbench.engine.placement.layers import QuantizedLayer
from workbench.errors import ConfigError

SUMMARY_WORST_LAYERS = 5


def metric_name_of(eval_fn: Any) -> str | None:
    """The name the views give an eval_fn's metric: its function name (None for a lambda)."""
    name = getattr(eval_fn, "__name__", None)
    return name if isinstance(name, str) and name.isidentifier() else None


def build_summary(
    layers: pd.DataFrame,
    storage: pd.DataFrame,
    model_stats: dict[str, float],
    config_text: str,
    metric_fp32: float | None = None,
    metric_quantized: float | None = None,
    metric_name: str | None = None,
) -> dict[str, Any]:
    """Sizes, compression, SQNR figures, the worst layers, and the metric when measured
    (``metric_name``: what the views call it, the eval_fn's name)."""
    total = storage[storage["layer"] == "TOTAL"].iloc[0]
    quantized = layers[layers["status"] == "quantized"]
    folded = (layers["status"] == "fp32") & layers.get(
        "folded_into", pd.Series(None, index=layers.index)
    ).notna()
    sqnr = quantized["output_sqnr_db"].astype(float)
    worst = quantized.sort_values("output_sqnr_db", na_position="first").head(SUMMARY_WORST_LAYERS)
    summary: dict[str, Any] = {
        "config": config_text,
        "layers_quantized": len(quantized),
        # folded layers (BatchNorm into its conv) are neither quantized nor kept FP32
        "layers_fp32": int(((layers["status"] == "fp32") & ~folded).sum()),
        "layers_folded": int(folded.sum()),
        "fp32_bytes": int(total["fp32_bytes"]),
        "quantized_bytes": int(total["total_bytes"]),
        "compression_ratio": float(total["fp32_bytes"]) / max(float(total["total_bytes"]), 1.0),
        "mean_output_sqnr_db": float(sqnr[sqnr.map(math.isfinite)].mean()) if len(sqnr) else None,
        "worst_output_sqnr_db": float(sqnr.min()) if len(sqnr) else None,
        "worst_layers": list(worst["layer"]),
    }
    summary |= model_stats
    if metric_fp32 is not None:
        summary["metric_fp32"] = float(metric_fp32)
        summary["metric_quantized"] = float(metric_quantized)
        summary["metric_drop"] = float(metric_fp32) - float(metric_quantized)
        summary["metric_name"] = metric_name
    return summary


class Report:
    """Per-layer error and storage report of a quantized model.

    Attributes
    ----------
    layers : pandas.DataFrame
        One row per parameter-holding layer (quantized or kept FP32, with the reason).
    storage : pandas.DataFrame
        Bytes per layer (``fp32_bytes``, ``weight_bytes``, ``scale_bytes``,
        ``zero_point_bytes``, ``bias_bytes``, ``total_bytes``) and a ``TOTAL`` row.
    summary : dict
        Sizes, compression ratio, SQNR figures, worst layers, metric FP32 vs quantized.
    sites : pandas.DataFrame
        One row per activation quantizer (layer inputs, model inputs, conv / add / concat /
        pool outputs, matmul inputs): ``site`` (the name ``QuantConfig.overrides`` matches),
        ``kind``, ``bits``, ``scale``, ``zero_point``, ``sqnr_db`` (``analysis.sites``); also
        a table of the HTML / JSON report.
    """

    def __init__(
        self,
        layers: pd.DataFrame,
        storage: pd.DataFrame,
        summary: dict[str, Any],
        model: nn.Module | None = None,
        extra_tables: dict[str, pd.DataFrame] | None = None,
    ) -> None:
        self.layers = layers
        self.storage = storage
        self.summary = summary
        self.extra_tables: dict[str, pd.DataFrame] = dict(extra_tables or {})
        self._model = model

    @property
    def sites(self) -> pd.DataFrame:
        """The activation quantizer sites (empty for a weight-only model)."""
        from workbench.analysis.sites import SITE_COLUMNS, SITES_TITLE

        table = self.extra_tables.get(SITES_TITLE)
        return table if table is not None else pd.DataFrame(columns=SITE_COLUMNS)

    # plots -------------------------------------------------------------------------------
    def plot_sqnr(self):
        """Bar chart of each quantized layer's output SQNR (dB)."""
        from workbench.analysis.plots import sqnr_bar_chart

        return sqnr_bar_chart(self.layers)

    def plot_storage(self):
        """Stacked bars of each layer's bytes, FP32 against quantized."""
        from workbench.analysis.plots import storage_breakdown_chart

        return storage_breakdown_chart(self.storage)

    def plot_weight_histogram(self, layer: str | None = None):
        """Weight histogram of ``layer`` (default: the worst layer) with the quantization grid."""
        from workbench.analysis.plots import weight_histogram

        if self._model is None:
            raise ConfigError("this report has no model attached; plot from result.report")
        quantized = {
            m.layer_name: m for m in self._model.modules() if isinstance(m, QuantizedLayer)
        }
        if not quantized:
            raise ConfigError("no layer was quantized, so there is no weight grid to plot")
        name = layer or (self.summary["worst_layers"] or list(quantized))[0]
        if name not in quantized:
            raise ConfigError(
                f"{name!r} is not a quantized layer; choose one of: {', '.join(quantized)}"
            )
        return weight_histogram(quantized[name], name)

    # display -----------------------------------------------------------------------------
    def summary_text(self) -> str:
        s = self.summary
        lines = [
            f"Quantization report ({s['config']})",
            f"  layers quantized: {s['layers_quantized']}, kept FP32: {s['layers_fp32']}"
            + (f", folded: {s['layers_folded']}" if s.get("layers_folded") else ""),
            (
                f"  size: {s['fp32_bytes']:,} B FP32 -> {s['quantized_bytes']:,} B "
                f"({s['compression_ratio']:.2f}x smaller)"
            ),
        ]
        if s.get("mean_output_sqnr_db") is not None:
            lines.append(
                f"  output SQNR: mean {s['mean_output_sqnr_db']:.1f} dB, "
                f"worst {s['worst_output_sqnr_db']:.1f} dB ({', '.join(s['worst_layers'][:3])})"
            )
        if s.get("model_output_cosine") is not None:
            lines.append(
                f"  model output vs FP32: cosine {s['model_output_cosine']:.3f}, "
                f"SQNR {s['model_output_sqnr_db']:.1f} dB"
            )
        if s.get("layer_errors_sample"):
            lines.append(f"  per-layer errors measured on the {s['layer_errors_sample']}")
        if s.get("stage_seconds"):
            times = ", ".join(f"{k} {v:.1f} s" for k, v in s["stage_seconds"].items())
            peak = s.get("peak_rss_bytes")
            memory = f"; process peak RSS {peak / 1024**3:.2f} GiB" if peak else ""
            lines.append(f"  time: {times}{memory}")
            fewer = [k for k, v in (s.get("stage_threads") or {}).items() if v < s["torch_threads"]]
            if fewer:
                lines.append(
                    f"  other processes kept CPUs busy: {', '.join(fewer)} ran on "
                    f"{min(s['stage_threads'][k] for k in fewer)} of torch's "
                    f"{s['torch_threads']} threads"
                )
        if "metric_fp32" in s:
            name = s.get("metric_name") or "eval_fn metric"
            lines.append(
                f"  {name}: FP32 {s['metric_fp32']:.3f} -> quantized {s['metric_quantized']:.3f} "
                f"(drop {s['metric_drop']:.3f})"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary_text()

    def _repr_html_(self) -> str:
        """The styled report view (summary, SQNR chart, layer table, storage, further
        tables) for front ends without the JupyterLab extension; no script."""
        from workbench.analysis.html.view import report_view_html

        return report_view_html(self.to_json())

    def view(self, *sections: str) -> ReportView:
        """Only some sections of the report view (``"summary"``, ``"chart"``, ``"layers"``,
        ``"storage"``, ``"tables"``), displayed like the report itself (the panel's tabs)."""
        return ReportView(self, sections)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-safe dict (schema: ``workbench/analysis/report_schema.json``)."""
        from workbench.analysis.report_json import report_to_json

        return report_to_json(self)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, Any]:
        from workbench.analysis.report_json import REPORT_MIME_TYPE

        return {
            "text/plain": self.summary_text(),
            "text/html": self._repr_html_(),
            REPORT_MIME_TYPE: self.to_json(),
        }

    def model_name(self) -> str | None:
        """The class name of the quantized model, when the report has one attached."""
        return type(self._model).__name__ if self._model is not None else None

    def to_html(self, path) -> None:
        """Write the report as one self-contained HTML page (inline CSS and SVG, no network;
        model name, date, versions; dark with the reader's colour scheme), atomically; missing
        folders on the way are created."""
        from workbench.analysis.html.page import report_page

        if not isinstance(path, str | os.PathLike):
            raise ConfigError(f"path must be a file path such as 'report.html', got {path!r}")
        page = report_page(self.to_json(), self.model_name())
        try:
            with atomic_path(Path(path), ".html") as temporary:
                temporary.write_text(page, encoding="utf-8")
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConfigError(
                f"cannot write the report to {str(path)!r}: {reason}; pass a file path in a "
                "folder you can write to"
            ) from exc


class ReportView:
    """Some sections of a report's view: the JupyterLab renderer shows them where the
    extension is installed, the same styled HTML elsewhere."""

    def __init__(self, report: Report, sections: tuple[str, ...]) -> None:
        from workbench.analysis.html.view import SECTIONS

        unknown = [s for s in sections if s not in SECTIONS]
        if unknown:
            raise ConfigError(f"unknown report sections {unknown}; choose from {list(SECTIONS)}")
        self.report = report
        self.sections = tuple(sections) or SECTIONS

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, Any]:
        from workbench.analysis.html.view import report_view_html
        from workbench.analysis.report_json import REPORT_MIME_TYPE

        bundle = self.report.to_json()
        return {
            "text/plain": self.report.summary_text(),
            "text/html": report_view_html(bundle, self.sections),
            REPORT_MIME_TYPE: bundle | {"sections": list(self.sections)},
        }
