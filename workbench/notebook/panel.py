"""The workbench panel: an ipywidgets app to try schemes on a model and compare the runs.

``wb.panel(model, calib_data, ...)`` returns a :class:`WorkbenchPanel`. Every button calls the
same public functions as the magic (through ``actions.py``); the panel only turns widget
values into arguments and results into tables. It is testable without a browser: set the
controls' ``.value``, call ``run_button.click()``, read ``panel.result`` / ``panel.runs``.

The Sensitivity tab ranks the layers of the current config (``wb.sensitivity``); with
"keep the N most sensitive layers FP32" set, Run calls ``wb.keep_most_sensitive_fp32`` with
that ranking (computed first when missing; PTQ only). "auto mixed precision" runs
``wb.auto_mixed_precision`` with the max drop instead of ``wb.ptq`` (after keeping the N
layers, when both are set).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import pandas as pd
from torch import nn

from workbench.analysis.layer_table import OVERVIEW_COLUMNS
from workbench.core.observers import OBSERVER_NAMES
from workbench.engine.config import PRESETS
from workbench.engine.layers import SUPPORTED_LAYER_TYPES
from workbench.engine.prepare import ROOT_NAME, matches_any
from workbench.errors import ModelError
from workbench.notebook import actions
from workbench.notebook.display import (
    error_line,
    figure_png,
    status_html,
    summary_html,
    table_html,
)
from workbench.notebook.recipe import DEFAULT_PRESET, MAX_BITS, MIN_BITS, build_config
from workbench.notebook.runs_table import RunsTable

TAB_TITLES = ("Summary", "Layers", "Storage", "Plots", "Sensitivity", "Export & Benchmark")
PLOTS_TAB = TAB_TITLES.index("Plots")
SENSITIVITY_TAB = TAB_TITLES.index("Sensitivity")
RUN_STEPS = 3  # quantize, tables, runs table
DEFAULT_NUM_BATCHES = 32
DEFAULT_EPOCHS, DEFAULT_LR = 1, 1e-4
DEFAULT_MAX_DROP = 0.5


def quantizable_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers a config can quantize or keep FP32 (Linear / Conv)."""
    return [
        name or ROOT_NAME
        for name, module in model.named_modules()
        if isinstance(module, SUPPORTED_LAYER_TYPES)
    ]


def count_batches(data: Any) -> int:
    """How many batches ``data`` holds when it can say so (a tensor is one batch)."""
    if data is None or isinstance(data, dict) or hasattr(data, "dim"):
        return 1
    try:
        return max(1, len(data))
    except TypeError:
        return DEFAULT_NUM_BATCHES


def layers_by_sqnr(layers: pd.DataFrame) -> pd.DataFrame:
    """The per-layer table, worst output SQNR first, layers kept FP32 last."""
    columns = [c for c in OVERVIEW_COLUMNS if c in layers.columns]
    ordered = layers.sort_values("output_sqnr_db", na_position="last", kind="stable")
    return ordered[columns].reset_index(drop=True)


class WorkbenchPanel(widgets.VBox):
    """Controls, a Run button, result tabs and a runs table for one model.

    Attributes
    ----------
    result : QuantResult or None
        The latest successful run, for use in the next cell.
    runs : RunsTable
        Every successful run of the session (``runs.frame`` is a DataFrame).
    error : str
        The last error, in one line ("" after a success).
    last_exception : Exception or None
        The last error itself, for a traceback when one is wanted.
    sensitivity_table : DataFrame or None
        The sensitivity table shown in the Sensitivity tab (most sensitive layer first).
    """

    def __init__(
        self,
        model: nn.Module,
        calib_data: Any = None,
        eval_fn: Callable[[nn.Module], float] | None = None,
        train_data: Any = None,
        loss_fn: Callable | None = None,
        example_input: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"wb.panel needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.calib_data = calib_data
        self.eval_fn = eval_fn
        self.train_data = train_data
        self.loss_fn = loss_fn
        self.example_input = example_input
        self.result = None
        self.runs = RunsTable()
        self.layers_table: pd.DataFrame | None = None
        self.error = ""
        self.last_exception: BaseException | None = None
        self.onnx_path = None
        self.benchmark = None
        self.sensitivity_table: pd.DataFrame | None = None
        self._sensitivity_tables: dict[tuple, pd.DataFrame] = {}
        self._sensitivity_stale = False
        self._run_number: int | None = None
        self._run_preset = DEFAULT_PRESET
        self._plots_stale = False
        self._busy = False
        self._build_controls()
        self._build_outputs()
        super().__init__(
            [
                widgets.HTML(self._title_html()),
                widgets.HBox([self.method, self.preset, self.observer]),
                widgets.HBox([self.bits, self.symmetric, self.per_channel]),
                widgets.HBox([self.num_batches, self.epochs, self.lr]),
                self.keep_fp32,
                widgets.HBox([self.keep_most_sensitive, self.mixed_precision, self.max_drop]),
                widgets.HBox([self.run_button, self.progress, self.status]),
                self.tabs,
                widgets.HTML("<b>Runs</b>"),
                self.runs_html,
                self.runs_plot,
            ]
        )
        self._on_preset()
        self._on_method()
        self._on_mixed_precision()

    def __repr__(self) -> str:
        latest = f"run {self._run_number}" if self._run_number else "no run yet"
        return f"WorkbenchPanel({type(self.model).__name__}, {len(self.runs)} runs, {latest})"

    # construction ------------------------------------------------------------------------
    def _title_html(self) -> str:
        import html

        layers = len(self.keep_fp32.options)
        name = html.escape(type(self.model).__name__)
        return f"<b>Quantization Workbench</b>: {name}, {layers} quantizable layers"

    def _build_controls(self) -> None:
        style = {"description_width": "initial"}
        self.method = widgets.ToggleButtons(
            options=[("PTQ", "ptq"), ("QAT", "qat")], value="ptq", description="method"
        )
        self.preset = widgets.Dropdown(
            options=list(PRESETS), value=DEFAULT_PRESET, description="preset"
        )
        self.observer = widgets.Dropdown(
            options=list(OBSERVER_NAMES), value="minmax", description="observer"
        )
        self.bits = widgets.BoundedIntText(
            value=8, min=MIN_BITS, max=MAX_BITS, description="weight bits", style=style
        )
        self.symmetric = widgets.ToggleButtons(
            options=[("symmetric", True), ("asymmetric", False)], value=True
        )
        self.per_channel = widgets.ToggleButtons(
            options=[("per-channel", True), ("per-tensor", False)], value=True
        )
        self.num_batches = widgets.BoundedIntText(
            value=count_batches(self.calib_data),
            min=1,
            max=1_000_000,
            description="calibration batches",
            style=style,
        )
        self.epochs = widgets.BoundedIntText(
            value=DEFAULT_EPOCHS, min=1, max=10_000, description="QAT epochs", style=style
        )
        self.lr = widgets.BoundedFloatText(
            value=DEFAULT_LR, min=1e-9, max=10.0, step=1e-5, description="QAT lr", style=style
        )
        names = quantizable_layer_names(self.model)
        self.keep_fp32 = widgets.SelectMultiple(
            options=names,
            value=(),
            rows=min(8, max(2, len(names))),
            description="keep FP32",
            style=style,
        )
        self.keep_most_sensitive = widgets.BoundedIntText(
            value=0,
            min=0,
            max=max(0, len(names) - 1),  # keeping every layer FP32 quantizes nothing
            description="keep the N most sensitive layers FP32",
            style=style,
        )
        self.mixed_precision = widgets.Checkbox(
            value=False,
            description="auto mixed precision (PTQ)",
            disabled=self.eval_fn is None,
            tooltip="needs eval_fn" if self.eval_fn is None else "",
            indent=False,
        )
        self.max_drop = widgets.BoundedFloatText(
            value=DEFAULT_MAX_DROP, min=0.0, max=1e12, step=0.1, description="max drop"
        )
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.progress = widgets.IntProgress(value=0, min=0, max=RUN_STEPS, bar_style="info")
        self.progress.layout.display = "none"
        self.status = widgets.HTML(status_html("Choose a scheme and press Run."))
        self.preset.observe(self._on_preset, names="value")
        self.method.observe(self._on_method, names="value")
        self.mixed_precision.observe(self._on_mixed_precision, names="value")
        self.run_button.on_click(self._on_run)

    def _build_outputs(self) -> None:
        self.summary_html = widgets.HTML()
        self.layers_html = widgets.HTML()
        self.storage_html = widgets.HTML()
        self.sqnr_plot = widgets.Image(format="png")
        self.storage_plot = widgets.Image(format="png")
        self.export_path = widgets.Text(value="model_int8.onnx", description="ONNX path")
        self.threads = widgets.BoundedIntText(
            value=1, min=1, max=os.cpu_count() or 1, description="threads"
        )
        self.export_button = widgets.Button(description="Export", icon="download", disabled=True)
        self.bench_button = widgets.Button(description="Benchmark", icon="clock", disabled=True)
        self.export_status = widgets.HTML(status_html("Run first, then export."))
        self.fusion_html = widgets.HTML()
        self.bench_html = widgets.HTML()
        self.export_button.on_click(self._on_export)
        self.bench_button.on_click(self._on_bench)
        self.sensitivity_button = widgets.Button(
            description="Compute sensitivity", icon="sort-amount-desc"
        )
        metric = "eval_fn" if self.eval_fn is not None else "the model output SQNR against FP32"
        self.sensitivity_status = widgets.HTML(
            status_html(
                f"Rank the layers of the current config by {metric}: each layer quantized "
                "alone, and every layer but that one."
            )
        )
        self.sensitivity_html = widgets.HTML()
        self.sensitivity_plot = widgets.Image(format="png")
        self.sensitivity_button.on_click(self._on_sensitivity)
        pages = [
            self.summary_html,
            self.layers_html,
            self.storage_html,
            widgets.VBox([self.sqnr_plot, self.storage_plot]),
            widgets.VBox(
                [
                    widgets.HBox([self.sensitivity_button, self.sensitivity_status]),
                    self.sensitivity_html,
                    self.sensitivity_plot,
                ]
            ),
            widgets.VBox(
                [
                    widgets.HBox([self.export_path, self.threads]),
                    widgets.HBox([self.export_button, self.bench_button]),
                    self.export_status,
                    self.fusion_html,
                    self.bench_html,
                ]
            ),
        ]
        self.tabs = widgets.Tab(children=pages, titles=TAB_TITLES)
        self.tabs.observe(self._on_tab, names="selected_index")
        self.runs_html = widgets.HTML()
        self.runs_plot = widgets.Image(format="png")

    # controls ----------------------------------------------------------------------------
    def _on_preset(self, _change=None) -> None:
        weight = PRESETS[self.preset.value].weight
        self.bits.value = weight.bits
        self.symmetric.value = weight.symmetric
        self.per_channel.value = weight.per_channel

    def _on_method(self, _change=None) -> None:
        qat = self.method.value == "qat"
        self.epochs.disabled = not qat
        self.lr.disabled = not qat
        self.num_batches.disabled = qat  # a PTQ option: QAT calibrates on calib_data whole

    def _on_mixed_precision(self, _change=None) -> None:
        self.max_drop.disabled = not self.mixed_precision.value

    def set_controls(
        self,
        method: str | None = None,
        preset: str | None = None,
        bits: int | None = None,
        symmetric: bool | None = None,
        per_channel: bool | None = None,
        observer: str | None = None,
        exclude: tuple[str, ...] = (),
        num_batches: int | None = None,
        epochs: int | None = None,
        lr: float | None = None,
        max_drop: float | None = None,
    ) -> None:
        """Set the controls; None leaves one as it is. ``exclude`` patterns select the layers
        they match in the keep-FP32 list; ``max_drop`` turns auto mixed precision on."""
        values = {
            self.method: method,
            self.preset: preset,  # before the scheme controls: a preset resets them
            self.bits: bits,
            self.symmetric: symmetric,
            self.per_channel: per_channel,
            self.observer: observer,
            self.num_batches: num_batches,
            self.epochs: epochs,
            self.lr: lr,
        }
        for control, value in values.items():
            if value is not None:
                control.value = value
        if max_drop is not None:
            self.max_drop.value = max_drop
            self.mixed_precision.value = True
        if exclude:
            self.keep_fp32.value = tuple(
                name for name in self.keep_fp32.options if matches_any(name, tuple(exclude))
            )

    def config(self):
        """The QuantConfig the controls describe."""
        return build_config(
            self.preset.value,
            self.bits.value,
            self.symmetric.value,
            self.per_channel.value,
            self.observer.value,
            tuple(self.keep_fp32.value),
        )

    # running -----------------------------------------------------------------------------
    def _set_busy(self, busy: bool, message: str = "", where: widgets.HTML | None = None) -> None:
        self._busy = busy
        self.run_button.disabled = busy
        self.sensitivity_button.disabled = busy
        self.export_button.disabled = busy or self.result is None
        self.bench_button.disabled = busy or self.result is None
        self.progress.layout.display = None if busy else "none"
        if busy:
            self.progress.value = 0
            (where or self.status).value = status_html(message)

    def _fail(self, exc: BaseException, where: widgets.HTML) -> None:
        self.last_exception = exc
        self.error = error_line(exc)
        where.value = status_html(self.error, "error")

    def _on_run(self, _button=None) -> None:
        if self._busy:
            return
        method = self.method.value
        self._set_busy(True, f"Running {method.upper()}...")
        try:
            config = self.config()
            table = None
            if self.keep_most_sensitive.value > 0 and method == "ptq":
                self.status.value = status_html("Ranking the layers by sensitivity...")
                table = self._sensitivity_for(config)
                self.status.value = status_html(f"Running {method.upper()}...")
            result = actions.quantize(
                self.model,
                config,
                method=method,
                calib_data=self.calib_data,
                train_data=self.train_data,
                loss_fn=self.loss_fn,
                epochs=self.epochs.value,
                lr=self.lr.value,
                eval_fn=self.eval_fn,
                num_batches=None if method == "qat" else self.num_batches.value,
                progress=False,
                max_drop=self.max_drop.value if self.mixed_precision.value else None,
                keep_most_sensitive=self.keep_most_sensitive.value,
                sensitivity=table,
            )
            self.progress.value = 1
            self._show_result(result)
            self.progress.value = 2
            self._run_number = self.runs.add(
                method, self.preset.value, result.config, result.report.summary
            )
            self._show_runs()
            self.progress.value = RUN_STEPS
        except Exception as exc:  # the panel stays usable; the error is shown in one line
            self._fail(exc, self.status)
        else:
            self.error, self.last_exception = "", None
            self.status.value = status_html(self._run_line(), "ok")
        finally:
            self._set_busy(False)

    def _run_line(self) -> str:
        s = self.result.report.summary
        line = f"Run {self._run_number} ({self.result.method.upper()}): {s['config']}; "
        line += f"{s['fp32_bytes']:,} B -> {s['quantized_bytes']:,} B"
        if s.get("metric_quantized") is not None:
            line += f"; metric {s['metric_fp32']:.4g} -> {s['metric_quantized']:.4g}"
        if s.get("kept_higher_precision"):
            line += f"; kept by sensitivity: {', '.join(s['kept_higher_precision'])}"
        return line

    def _show_result(self, result) -> None:
        self.result = result
        self.onnx_path = self.benchmark = None
        report = result.report
        self.summary_html.value = summary_html(report.summary_text())
        self.layers_table = layers_by_sqnr(report.layers)
        self.layers_html.value = table_html(self.layers_table)
        self.storage_html.value = table_html(report.storage)
        self.export_status.value = status_html("Not exported yet.")
        self.fusion_html.value = self.bench_html.value = ""
        self._plots_stale = True
        if self.tabs.selected_index == PLOTS_TAB:
            self._draw_plots()

    def _show_runs(self) -> None:
        self.runs_html.value = table_html(self.runs.frame)
        figure = self.runs.plot()
        if figure is not None:
            self.runs_plot.value = figure_png(figure)

    def _on_tab(self, _change=None) -> None:
        try:
            if self.tabs.selected_index == PLOTS_TAB and self._plots_stale:
                self._draw_plots()
            if self.tabs.selected_index == SENSITIVITY_TAB and self._sensitivity_stale:
                self._draw_sensitivity()
        except Exception as exc:
            self._fail(exc, self.status)

    def _draw_plots(self) -> None:
        self.sqnr_plot.value = figure_png(self.result.report.plot_sqnr())
        self.storage_plot.value = figure_png(self.result.report.plot_storage())
        self._plots_stale = False

    # sensitivity -------------------------------------------------------------------------
    def _sensitivity_key(self, config) -> tuple:
        return (config, self.num_batches.value)

    def _sensitivity_for(self, config) -> pd.DataFrame:
        """The sensitivity table of ``config``: the one computed before, else a new one."""
        table = self._sensitivity_tables.get(self._sensitivity_key(config))
        if table is None:
            table = self._compute_sensitivity(config)
        return table

    def _compute_sensitivity(self, config) -> pd.DataFrame:
        table = actions.sensitivity(
            self.model,
            self.calib_data if self.calib_data is not None else self.train_data,
            config,
            eval_fn=self.eval_fn,
            num_batches=self.num_batches.value,
            progress=False,
        )
        self._sensitivity_tables[self._sensitivity_key(config)] = table
        self._show_sensitivity(table, config)
        return table

    def _show_sensitivity(self, table: pd.DataFrame, config) -> None:
        self.sensitivity_table = table
        self.sensitivity_html.value = table_html(table)
        metric = table.attrs.get("metric", "metric")
        line = f"{len(table)} layers of {config.describe()}, most sensitive first ({metric}"
        if metric == "eval_fn":
            line += f", FP32 {table.attrs['metric_fp32']:.4g}"
        line += f"; {table.attrs.get('eval_calls', 0)} eval_fn calls)"
        self.sensitivity_status.value = status_html(line, "ok")
        self._sensitivity_stale = True
        if self.tabs.selected_index == SENSITIVITY_TAB:
            self._draw_sensitivity()

    def _draw_sensitivity(self) -> None:
        from workbench.analysis.sensitivity_plots import sensitivity_chart

        self.sensitivity_plot.value = figure_png(sensitivity_chart(self.sensitivity_table))
        self._sensitivity_stale = False

    def _on_sensitivity(self, _button=None) -> None:
        if self._busy:
            return
        self._set_busy(True, "Ranking the layers by sensitivity...", self.sensitivity_status)
        try:
            self._compute_sensitivity(self.config())
            self.error, self.last_exception = "", None
        except Exception as exc:
            self._fail(exc, self.sensitivity_status)
        finally:
            self._set_busy(False)

    # export and benchmark ----------------------------------------------------------------
    def _example(self) -> Any:
        if self.example_input is not None:
            return self.example_input
        return actions.first_input(
            self.calib_data if self.calib_data is not None else self.train_data
        )

    def _on_export(self, _button=None) -> None:
        if self._busy or self.result is None:
            return
        self._set_busy(True, "Exporting...", self.export_status)
        try:
            self._export()
        except Exception as exc:
            self._fail(exc, self.export_status)
        finally:
            self._set_busy(False)

    def _export(self) -> None:
        from workbench.runtime.fusion_check import REPORT_TITLE

        path = actions.export(self.result, self.export_path.value, self._example())
        self.onnx_path = path
        fusion = self.result.report.extra_tables.get(REPORT_TITLE)
        if fusion is not None:
            self.fusion_html.value = f"<b>{REPORT_TITLE}</b>" + table_html(fusion)
        self.error, self.last_exception = "", None
        self.export_status.value = status_html(f"Exported {path} ({path.stat().st_size:,} B)", "ok")

    def _on_bench(self, _button=None) -> None:
        if self._busy or self.result is None:
            return
        self._set_busy(True, "Benchmarking on ONNX Runtime...", self.export_status)
        try:
            if self.onnx_path is None:
                self._export()
            self.benchmark = actions.benchmark(
                self.result, self._example(), self.onnx_path, self.threads.value
            )
            fp32_ms, int8_ms = actions.latencies_ms(self.benchmark)
            self.runs.set_latency(self._run_number, fp32_ms, int8_ms)
            self.bench_html.value = summary_html(self.benchmark.summary_text()) + table_html(
                self.benchmark.table
            )
            self._show_runs()
            self.export_status.value = status_html(f"Benchmarked {self.onnx_path}", "ok")
            self.error, self.last_exception = "", None
        except Exception as exc:
            self._fail(exc, self.export_status)
        finally:
            self._set_busy(False)


def panel(
    model: nn.Module,
    calib_data: Any = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    train_data: Any = None,
    loss_fn: Callable | None = None,
    example_input: Any = None,
) -> WorkbenchPanel:
    """An ipywidgets panel to quantize ``model`` with PTQ or QAT and compare the runs.

    Parameters
    ----------
    model : nn.Module
        The model to quantize (never modified).
    calib_data : DataLoader, iterable of batches, or tensor
        Calibration data for PTQ.
    eval_fn : callable, optional
        ``eval_fn(model) -> float`` (higher is better), shown for FP32 and each run; the
        metric of the Sensitivity tab and of auto mixed precision.
    train_data, loss_fn : optional
        Training data and ``loss_fn(output, target)`` for QAT.
    example_input : tensor, optional
        Input for ONNX export and benchmark (default: the first calibration batch).
    """
    return WorkbenchPanel(model, calib_data, eval_fn, train_data, loss_fn, example_input)
