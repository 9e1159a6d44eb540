"""The workbench panel: an ipywidgets app to try schemes on a model and compare the runs.

``wb.panel(model, calib_data, ...)`` returns a :class:`WorkbenchPanel`. Every button calls the
same public functions as the magic (through ``actions.py``); the panel only turns widget
values into arguments and results into tables. It is testable without a browser: set the
controls' ``.value``, call ``run_button.click()``, read ``panel.result`` / ``panel.runs``.

The Sensitivity tab ranks the layers of the current config (``wb.sensitivity``); with
"keep the N most sensitive layers FP32" set, Run calls ``wb.keep_most_sensitive_fp32`` with
that ranking (computed first when missing). "auto mixed precision" runs
``wb.auto_mixed_precision`` with the max drop instead of ``wb.ptq`` (after keeping the N
layers, when both are set). With QAT, ``wb.qat`` runs the same search first and trains with
the precisions it chose.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import pandas as pd
from torch import nn

from workbench.errors import ModelError
from workbench.notebook import actions
from workbench.notebook.autotune_tab import AutotuneTab
from workbench.notebook.display import error_line, significant, status_html, table_html
from workbench.notebook.export_tab import ExportTab
from workbench.notebook.generation_section import GenerationSection
from workbench.notebook.panel_controls import RUN_STEPS, PanelControls
from workbench.notebook.report_tabs import PLOTS_PAGE, ReportTabs
from workbench.notebook.report_tabs import TITLES as REPORT_TITLES
from workbench.notebook.runs_view import RunsView
from workbench.notebook.sensitivity_tab import SensitivityTab
from workbench.notebook.widget_layout import PRECISION_PX, fit_layer_lists, show_none_option

TAB_TITLES = (*REPORT_TITLES, "Sensitivity", "Export & Benchmark")
PLOTS_TAB = PLOTS_PAGE
SENSITIVITY_TAB = TAB_TITLES.index("Sensitivity")
OVERVIEW_ORDER = "output_sqnr_db"


def layers_by_sqnr(layers: pd.DataFrame) -> pd.DataFrame:
    """The per-layer table, worst output SQNR first, layers kept FP32 last."""
    ordered = layers.sort_values(OVERVIEW_ORDER, na_position="last", kind="stable")
    return ordered.reset_index(drop=True)


class WorkbenchPanel(PanelControls, widgets.VBox):
    """An ipywidgets panel to quantize ``model`` with PTQ or QAT and compare the runs
    (``wb.panel``): controls, a Run button, result tabs and a runs table.

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
    report_data : optional
        Held-out batches on which each run's report measures the per-layer errors
        (default: the calibration batches).
    tokenizer : optional
        The tokenizer of a decoder LM (LLaMA, Mistral, Qwen2), for the generation benchmark
        on ONNX Runtime GenAI in the Export & Benchmark tab.

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
        report_data: Any = None,
        tokenizer: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"wb.panel needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.calib_data = calib_data
        self.eval_fn = eval_fn
        self.train_data = train_data
        self.loss_fn = loss_fn
        self.example_input = example_input
        self.report_data = report_data
        self.tokenizer = tokenizer
        self.result = None
        self.layers_table: pd.DataFrame | None = None
        self.error = ""
        self.last_exception: BaseException | None = None
        self.onnx_path = None
        self.benchmark = None
        self._run_number: int | None = None
        self._busy = False
        self._build_controls()
        self._build_outputs()
        super().__init__(
            [
                widgets.HTML(self._title_html()),
                *self.control_rows(),
                self.keep_fp32,
                self.layer_precision.box,
                widgets.HBox([self.keep_most_sensitive, self.mixed_precision, self.max_drop]),
                widgets.HBox([self.run_button, self.progress, self.status]),
                self.tabs,
                self.runs_view.box,
            ]
        )
        self._on_preset()
        self._on_method()
        self._on_mixed_precision()
        self.auto = AutotuneTab.attach(self)  # the Auto tab (wb.autotune), its own module
        self.generation = GenerationSection.attach(self)  # decoders on ONNX Runtime GenAI
        self.add_class("jp-WorkbenchPanel")  # report_view.css styles its tab titles
        fit_layer_lists((self.keep_fp32, 0), (self.layer_precision.layers, PRECISION_PX))
        for child in self._control_widgets():
            if isinstance(child, widgets.Dropdown):
                show_none_option(child)

    def _control_widgets(self) -> list[widgets.Widget]:
        """Every control of the panel (the boxes above the Run button, unpacked)."""
        found, todo = [], list(self.children)
        while todo:
            child = todo.pop(0)
            if isinstance(child, widgets.Box):
                todo.extend(child.children)
            else:
                found.append(child)
        return found

    def __repr__(self) -> str:
        latest = f"run {self._run_number}" if self._run_number else "no run yet"
        return f"WorkbenchPanel({type(self.model).__name__}, {len(self.runs)} runs, {latest})"

    def _repr_mimebundle_(self, **kwargs) -> dict:
        """The widget, and for front ends that cannot show it (a reloaded notebook whose
        kernel is gone, an untrusted one, a static viewer) the latest result as HTML
        instead of the repr line."""
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["text/html"] = self.snapshot_html()
        return bundle

    def snapshot_html(self) -> str:
        """The panel's state as static HTML: its title, the latest result's summary and the
        runs table, or how to bring the controls back."""
        parts = [f"<p>{self._title_html()}</p>"]
        if self.result is not None:
            parts.append(self.result.report.view("summary")._repr_mimebundle_()["text/html"])
            parts.append(table_html(self.runs.display_frame()))
        parts.append(
            status_html("The panel's controls need a running kernel: run this cell again.")
        )
        return "".join(parts)

    @property
    def runs(self):
        """The runs table (``RunsTable``)."""
        return self.runs_view.runs

    @property
    def sensitivity_table(self) -> pd.DataFrame | None:
        return self.sensitivity.table

    # construction ------------------------------------------------------------------------
    def _title_html(self) -> str:
        layers = len(self.keep_fp32.options)
        name = html.escape(type(self.model).__name__)
        return f"<b>Quantization Workbench</b>: {name}, {layers} quantizable layers"

    def _build_outputs(self) -> None:
        self.report_tabs = ReportTabs()
        self.summary_view, self.layers_view, self.storage_view = self.report_tabs.views.values()
        self.plots_view = self.report_tabs.plots
        metric = (
            "eval_fn"
            if self.eval_fn is not None
            else "the model output's SQNR and cosine against FP32 (no eval_fn given)"
        )
        self.sensitivity = SensitivityTab(metric, self._rank_layers)
        self.sensitivity_button = self.sensitivity.button
        self.sensitivity_status = self.sensitivity.status
        self.sensitivity_html = self.sensitivity.html
        self.sensitivity_plot = self.sensitivity.plot
        self.sensitivity_button.on_click(self._on_sensitivity)
        self.export = ExportTab()
        self.export_path, self.threads = self.export.export_path, self.export.threads
        self.export_button, self.bench_button = self.export.export_button, self.export.bench_button
        self.export_status = self.export.status
        self.fusion_html, self.bench_html = self.export.fusion_html, self.export.bench_html
        self.export_button.on_click(self._on_export)
        self.bench_button.on_click(self._on_bench)
        pages = [*self.report_tabs.pages, self.sensitivity.page, self.export.page]
        self.tabs = widgets.Tab(children=pages, titles=TAB_TITLES)
        self.tabs.observe(self._on_tab, names="selected_index")
        self.runs_view = RunsView()
        self.runs_html, self.runs_plot = self.runs_view.html, self.runs_view.plot

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
            if self.keep_most_sensitive.value > 0:
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
                eval_fn=self.eval_fn,
                progress=False,
                sensitivity=table,
                report_data=self.report_data,
                **self.run_options(),
            )
            self.progress.value = 1
            self._show_result(result)
            self.progress.value = 2
            self._run_number = self.runs.add(
                method, self.preset.value, result.config, result.report.summary
            )
            self.runs_view.refresh()
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
        line += f"{s['fp32_bytes']:,} B \u2192 {s['quantized_bytes']:,} B"
        if s.get("metric_quantized") is not None:
            name = s.get("metric_name") or "metric"
            before, after = significant(s["metric_fp32"], 4), significant(s["metric_quantized"], 4)
            line += f"; {name} {before} \u2192 {after}"
        if s.get("kept_higher_precision"):
            line += f"; kept by sensitivity: {', '.join(s['kept_higher_precision'])}"
        return line

    def _show_result(self, result) -> None:
        self.result = result
        self.onnx_path = self.benchmark = None
        self.layers_table = layers_by_sqnr(result.report.layers)
        self.report_tabs.show(result.report, self.tabs.selected_index == PLOTS_TAB)
        self.export.reset()
        self.generation.show_for(result)

    def _on_tab(self, _change=None) -> None:
        try:
            if self.tabs.selected_index == PLOTS_TAB:
                self.report_tabs.draw_plots()
            if self.tabs.selected_index == SENSITIVITY_TAB:
                self.sensitivity.draw()
        except Exception as exc:
            self._fail(exc, self.status)

    # sensitivity -------------------------------------------------------------------------
    def _rank_layers(self, config, on_layer=None) -> pd.DataFrame:
        return actions.sensitivity(
            self.model,
            self.calib_data if self.calib_data is not None else self.train_data,
            config,
            eval_fn=self.eval_fn,
            num_batches=self.num_batches.value,
            progress=False,
            on_layer=on_layer,
        )

    def _sensitivity_open(self) -> bool:
        return self.tabs.selected_index == SENSITIVITY_TAB

    def _sensitivity_for(self, config) -> pd.DataFrame:
        """The sensitivity table of ``config``: the one computed before, else a new one."""
        return self.sensitivity.table_for(config, self.num_batches.value, self._sensitivity_open())

    def _on_sensitivity(self, _button=None) -> None:
        if self._busy:
            return
        self._set_busy(True, "Ranking the layers by sensitivity...", self.sensitivity_status)
        try:
            self.sensitivity.compute(
                self.config(), self.num_batches.value, self._sensitivity_open()
            )
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
        path = actions.export(self.result, self.export_path.value, self._example())
        self.onnx_path = path
        title, fusion = actions.fusion_table(self.result)
        if fusion is not None:
            self.export.show_fusion(title, fusion)
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
            self.export.show_benchmark(self.benchmark)
            self.runs_view.refresh()
            self.export_status.value = status_html(f"Benchmarked {self.onnx_path}", "ok")
            self.error, self.last_exception = "", None
        except Exception as exc:
            self._fail(exc, self.export_status)
        finally:
            self._set_busy(False)


# ``wb.panel(model, calib_data, ...)`` builds the panel: the class itself, so that its
# parameters are written once
panel = WorkbenchPanel
