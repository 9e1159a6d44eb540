"""The panel's Auto tab: ``wb.autotune`` on the panel's model, calibration data and eval_fn,
with the candidates table and the chart (metric against latency or size) updated after every
candidate. The best run then becomes the panel's result (its report in the report tabs, a row
in the runs table, ready for Export & Benchmark).

The panel attaches it with one line (``AutotuneTab.attach(panel)``); the tab calls only
``wb.autotune`` and the panel's own result display.
"""

from __future__ import annotations

import ipywidgets as widgets
import pandas as pd

from workbench.notebook.display import error_line, figure_svg, status_html, table_html
from workbench.workflows.autotune import autotune
from workbench.workflows.autotune_budget import DEFAULT_EVALUATIONS

TITLE = "Auto"
SHOWN = {
    "candidate": "Candidate",
    "stage": "Stage",
    "status": "Status",
    "metric": "Metric",
    "drop": "Drop",
    "latency_vs_fp32": "Latency / FP32",
    "file_bytes": "File (bytes)",
    "seconds": "Seconds",
    "reason": "Why stopped / skipped",
}


class AutotuneTab:
    """The tab's controls, the live table and chart, and the search's outcome (``result``)."""

    def __init__(self, panel) -> None:
        self.panel = panel
        self.max_drop = widgets.BoundedFloatText(
            value=0.01, min=0.0, max=1e9, step=0.001, description="max drop"
        )
        self.objective = widgets.ToggleButtons(
            options=[("fastest", "latency"), ("smallest", "size")], value="latency"
        )
        self.evaluations = widgets.BoundedIntText(
            value=DEFAULT_EVALUATIONS, min=2, max=100_000, description="evaluations"
        )
        self.seconds = widgets.BoundedFloatText(
            value=0.0, min=0.0, max=1e7, description="seconds", tooltip="0: no time limit"
        )
        self.button = widgets.Button(description="Autotune", icon="search")
        self.status = widgets.HTML(
            status_html(
                "Search presets, observers, methods and per-layer precision for the fastest "
                "(or smallest) exported model within max drop of FP32 on eval_fn."
            )
        )
        self.html = widgets.HTML()
        self.plot = widgets.Image(format="svg+xml", layout=widgets.Layout(display="none"))
        self.page = widgets.VBox(
            [
                widgets.HBox([self.max_drop, self.objective]),
                widgets.HBox([self.evaluations, self.seconds]),
                widgets.HBox([self.button, self.status]),
                self.plot,
                self.html,
            ]
        )
        self.result = None
        self.updates = 0
        self.button.on_click(self._on_run)

    @classmethod
    def attach(cls, panel) -> AutotuneTab:
        """A new tab at the end of ``panel.tabs``."""
        tab = cls(panel)
        panel.tabs.children = (*panel.tabs.children, tab.page)
        panel.tabs.set_title(len(panel.tabs.children) - 1, TITLE)
        return tab

    def _budget(self) -> dict[str, float]:
        budget: dict[str, float] = {"evaluations": self.evaluations.value}
        if self.seconds.value > 0:
            budget["seconds"] = self.seconds.value
        return budget

    def show(self, table: pd.DataFrame) -> None:
        """The candidates so far: the table, and the chart once a file was timed."""
        self.updates += 1
        self.html.value = table_html(table[list(SHOWN)], SHOWN)
        from workbench.analysis.autotune_plot import autotune_chart

        measured = table[table["metric"].notna() & table["drop"].notna()]
        if table["file_bytes"].notna().any() and not measured.empty:
            first = measured.iloc[0]
            metric_fp32 = float(first["metric"]) + float(first["drop"])
            chart = autotune_chart(table, metric_fp32, self.max_drop.value, self.objective.value)
            self.plot.value = figure_svg(chart)
            self.plot.layout.display = None

    def _on_run(self, _button=None) -> None:
        panel = self.panel
        if panel._busy:
            return
        panel._set_busy(True, "Autotune: searching...", self.status)
        self.button.disabled = True
        try:
            calib = panel.calib_data if panel.calib_data is not None else panel.train_data
            self.result = autotune(
                panel.model,
                calib,
                panel.eval_fn,
                max_drop=self.max_drop.value,
                objective=self.objective.value,
                budget=self._budget(),
                example_input=panel.example_input,
                callback=self.show,
            )
            self.show(self.result.table)
            self._adopt_best()
        except Exception as exc:  # the panel stays usable; the error is shown in one line
            panel._fail(exc, self.status)
            self.status.value = status_html(error_line(exc), "error")
        finally:
            self.button.disabled = False
            panel._set_busy(False)

    def _adopt_best(self) -> None:
        """The best run becomes the panel's result and a row of its runs table."""
        result, panel = self.result, self.panel
        line = result.summary_text().splitlines()[1].strip()
        if result.best is None:
            self.status.value = status_html(f"Autotune: {line}", "error")
            return
        panel._show_result(result.best)
        panel._run_number = panel.runs.add(
            "auto",
            str(result.best_row["candidate"]),
            result.best.config,
            result.best.report.summary,
        )
        row = result.best_row
        if not pd.isna(row["latency_ms"]):
            panel.runs.set_latency(
                panel._run_number, float(row["fp32_latency_ms"]), float(row["latency_ms"])
            )
        panel.runs_view.refresh()
        kind = "ok" if result.budget_met else "error"
        self.status.value = status_html(f"Autotune ({result.stopped_because}): {line}", kind)
