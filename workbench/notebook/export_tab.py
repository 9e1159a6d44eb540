"""The panel's Export & Benchmark tab: the ONNX path and thread count, the two buttons, and
what they report (ONNX Runtime's fusion table, the benchmark)."""

from __future__ import annotations

import os

import ipywidgets as widgets

from workbench.notebook.display import status_html, table_html, text_html

FUSION_HEADERS = {
    "layer": "Layer",
    "op_type": "Op",
    "fused": "Fused",
    "kernel": "Kernel",
    "reason": "Reason",
}
BENCH_HEADERS = {
    "model": "Model",
    "latency_p50_ms": "Latency p50 (ms)",
    "latency_p90_ms": "Latency p90 (ms)",
    "latency_mean_ms": "Latency mean (ms)",
    "throughput_per_s": "Throughput (samples/s)",
    "file_bytes": "File (bytes)",
    "size_vs_fp32": "Size vs FP32",
    "speedup_vs_fp32": "Speedup vs FP32",
}


class ExportTab:
    """The tab's widgets; the panel wires the buttons."""

    def __init__(self) -> None:
        self.export_path = widgets.Text(value="model_int8.onnx", description="ONNX path")
        self.threads = widgets.BoundedIntText(
            value=1, min=1, max=os.cpu_count() or 1, description="threads"
        )
        self.export_button = widgets.Button(description="Export", icon="download", disabled=True)
        self.bench_button = widgets.Button(description="Benchmark", icon="clock", disabled=True)
        self.status = widgets.HTML(status_html("Run first, then export."))
        self.fusion_html = widgets.HTML()
        self.bench_html = widgets.HTML()
        self.page = widgets.VBox(
            [
                widgets.HBox([self.export_path, self.threads]),
                widgets.HBox([self.export_button, self.bench_button]),
                self.status,
                self.fusion_html,
                self.bench_html,
            ]
        )

    def reset(self) -> None:
        self.status.value = status_html("Not exported yet.")
        self.fusion_html.value = self.bench_html.value = ""

    def show_fusion(self, title: str, table) -> None:
        self.fusion_html.value = text_html(title) + table_html(table, FUSION_HEADERS)

    def show_benchmark(self, bench) -> None:
        self.bench_html.value = text_html(bench.summary_text()) + table_html(
            bench.table, BENCH_HEADERS
        )
