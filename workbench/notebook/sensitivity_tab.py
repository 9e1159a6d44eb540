"""The panel's Sensitivity tab: rank the layers of the current config (``wb.sensitivity``
through ``actions.sensitivity``) with a progress bar that moves per layer, and show the
ranking as the report view's chart and table (theme colours, readable names, own scroll
boxes; the table sorted and filtered by the two controls above it). Without ``eval_fn`` the
ranking is by the model output's SQNR against FP32 and the chart's caption says so. The
rankings are kept per (config, batches), so that "keep the N most sensitive layers FP32"
reuses them."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
import pandas as pd

from workbench.analysis.sensitivity_plots import (
    sensitivity_chart_svg,
    sensitivity_table_html,
    table_columns,
)
from workbench.notebook.display import significant, status_html, styled

RANK = "rank"


class SensitivityTab:
    """The tab's widgets, the rankings computed so far, and how one is shown."""

    def __init__(
        self, metric: str, compute: Callable[[object, Callable[[int, int], None]], pd.DataFrame]
    ) -> None:
        self._compute = compute
        self.button = widgets.Button(
            description="Compute sensitivity",
            icon="sort-amount-desc",
            layout=widgets.Layout(width="auto", flex="0 0 auto"),
        )
        self.progress = widgets.IntProgress(
            value=0, min=0, max=1, description="layers", bar_style="info"
        )
        self.progress.layout.display = "none"
        self.status = widgets.HTML(
            status_html(
                f"Rank the layers of the current config by {metric}: each layer quantized "
                "alone, and every layer but that one."
            )
        )
        self.filter = widgets.Text(
            placeholder="Filter layers by name", description="filter", continuous_update=True
        )
        self.sort = widgets.Dropdown(options=[("rank", RANK)], value=RANK, description="sort by")
        self.descending = widgets.Checkbox(value=False, description="descending", indent=False)
        self.controls = widgets.HBox([self.filter, self.sort, self.descending])
        self.controls.layout.display = "none"
        self.html = widgets.HTML()
        self.plot = widgets.HTML()
        self.page = widgets.VBox(
            [
                widgets.HBox([self.button, self.progress]),
                self.status,
                self.plot,
                self.controls,
                self.html,
            ]
        )
        for control in (self.filter, self.sort, self.descending):
            control.observe(self._show_table, names="value")
        self.table: pd.DataFrame | None = None
        self._tables: dict[tuple, pd.DataFrame] = {}
        self._stale = False

    def table_for(self, config, num_batches: int, open_now: bool) -> pd.DataFrame:
        """The ranking of ``config``: the one computed before, else a new one."""
        table = self._tables.get((config, num_batches))
        if table is None:
            table = self.compute(config, num_batches, open_now)
        return table

    def _on_layer(self, done: int, total: int) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = done

    def compute(self, config, num_batches: int, open_now: bool) -> pd.DataFrame:
        self.progress.value = 0
        self.progress.layout.display = None
        try:
            table = self._compute(config, self._on_layer)
        finally:
            self.progress.layout.display = "none"
        self._tables[(config, num_batches)] = table
        self.table = table
        columns = table_columns(table)
        self.sort.options = [("rank", RANK)] + [(label, c) for c, label, _ in columns]
        self.sort.value = RANK
        self.controls.layout.display = None
        self._show_table()
        metric = table.attrs.get("metric", "metric")
        line = f"{len(table)} layers of {config.describe()}, most sensitive first ("
        if metric == "eval_fn":
            line += f"eval_fn, FP32 {significant(table.attrs['metric_fp32'], 4)}"
        else:
            line += "no eval_fn: the model output's SQNR and cosine against FP32"
        line += f"; {table.attrs.get('eval_calls', 0)} eval_fn calls)"
        self.status.value = status_html(line, "ok")
        self._stale = True
        if open_now:
            self.draw()
        return table

    def shown_rows(self) -> pd.DataFrame:
        """The table's rows as shown: filtered by name, sorted by the chosen column."""
        table = self.table
        needle = self.filter.value.strip().lower()
        if needle:
            table = table[table["layer"].str.lower().str.contains(needle, regex=False)]
        if self.sort.value != RANK:
            table = table.sort_values(
                self.sort.value,
                ascending=not self.descending.value,
                na_position="last",
                kind="stable",
            )
        elif self.descending.value:
            table = table.iloc[::-1]
        return table

    def _show_table(self, _change=None) -> None:
        if self.table is not None:
            self.html.value = styled(sensitivity_table_html(self.table, self.shown_rows()))

    def draw(self) -> None:
        if not self._stale or self.table is None:
            return
        self.plot.value = styled(sensitivity_chart_svg(self.table))
        self._stale = False
