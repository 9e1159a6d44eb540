"""The panel's runs section: the runs table (friendly headers, units, latency, speedup and
Pareto in the first columns) and the metric-against-size plot; hidden before the first run
(no empty image placeholder)."""

from __future__ import annotations

import ipywidgets as widgets

from workbench.notebook.display import figure_svg, table_html
from workbench.notebook.runs_table import RunsTable


class RunsView:
    """The runs of the session, as a table and a plot."""

    def __init__(self) -> None:
        self.runs = RunsTable()
        self.html = widgets.HTML()
        self.plot = widgets.Image(format="svg+xml", layout=widgets.Layout(width="560px"))
        self.box = widgets.VBox([widgets.HTML("<b>Runs</b>"), self.html, self.plot])
        self.box.layout.display = "none"

    def refresh(self) -> None:
        self.box.layout.display = None if len(self.runs) else "none"
        self.html.value = table_html(self.runs.display_frame())
        figure = self.runs.plot()
        if figure is not None:
            self.plot.value = figure_svg(figure)
