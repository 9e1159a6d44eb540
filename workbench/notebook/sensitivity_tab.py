"""The panel's Sensitivity tab: rank the layers of the current config (``wb.sensitivity``
through ``actions.sensitivity``), show the table and the drop chart. The rankings are kept
per (config, batches), so that "keep the N most sensitive layers FP32" reuses them."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
import pandas as pd

from workbench.notebook.display import figure_svg, significant, status_html, table_html

HEADERS = {
    "layer": "Layer",
    "type": "Type",
    "metric_only_this_quantized": "Metric, only this quantized",
    "metric_all_but_this_quantized": "Metric, all but this quantized",
    "drop_only_this": "Drop, only this quantized",
    "output_cosine_only_this": "Output cosine, only this quantized",
}


class SensitivityTab:
    """The tab's widgets, the rankings computed so far, and how one is shown."""

    def __init__(self, metric: str, compute: Callable[[object], pd.DataFrame]) -> None:
        self._compute = compute
        self.button = widgets.Button(
            description="Compute sensitivity",
            icon="sort-amount-desc",
            layout=widgets.Layout(width="auto"),
        )
        self.status = widgets.HTML(
            status_html(
                f"Rank the layers of the current config by {metric}: each layer quantized "
                "alone, and every layer but that one."
            )
        )
        self.html = widgets.HTML()
        self.plot = widgets.Image(format="svg+xml", layout=widgets.Layout(display="none"))
        self.page = widgets.VBox([widgets.HBox([self.button, self.status]), self.html, self.plot])
        self.table: pd.DataFrame | None = None
        self._tables: dict[tuple, pd.DataFrame] = {}
        self._stale = False

    def table_for(self, config, num_batches: int, open_now: bool) -> pd.DataFrame:
        """The ranking of ``config``: the one computed before, else a new one."""
        table = self._tables.get((config, num_batches))
        if table is None:
            table = self.compute(config, num_batches, open_now)
        return table

    def compute(self, config, num_batches: int, open_now: bool) -> pd.DataFrame:
        table = self._compute(config)
        self._tables[(config, num_batches)] = table
        self.table = table
        self.html.value = table_html(table, HEADERS)
        metric = table.attrs.get("metric", "metric")
        line = f"{len(table)} layers of {config.describe()}, most sensitive first ({metric}"
        if metric == "eval_fn":
            line += f", FP32 {significant(table.attrs['metric_fp32'], 4)}"
        line += f"; {table.attrs.get('eval_calls', 0)} eval_fn calls)"
        self.status.value = status_html(line, "ok")
        self._stale = True
        if open_now:
            self.draw()
        return table

    def draw(self) -> None:
        if not self._stale or self.table is None:
            return
        from workbench.analysis.sensitivity_plots import sensitivity_chart

        self.plot.value = figure_svg(sensitivity_chart(self.table))
        self.plot.layout.display = None
        self._stale = False
