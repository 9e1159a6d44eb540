"""The panel's runs section: the runs table (friendly headers, units, latency, speedup and
Pareto in the first columns) and the metric-against-size chart (SVG in the report view's
classes, ``runs_chart.py``); hidden before the first run."""

from __future__ import annotations

import ipywidgets as widgets

from workbench.notebook.display import styled, table_html
from workbench.notebook.runs_chart import runs_chart_svg
from workbench.notebook.runs_table import RunsTable


class RunsView:
    """The runs of the session, as a table and a chart."""

    def __init__(self) -> None:
        self.runs = RunsTable()
        self.html = widgets.HTML()
        self.plot = widgets.HTML()
        self.box = widgets.VBox([widgets.HTML("<b>Runs</b>"), self.html, self.plot])
        self.box.layout.display = "none"

    def refresh(self) -> None:
        self.box.layout.display = None if len(self.runs) else "none"
        self.html.value = table_html(self.runs.display_frame())
        if len(self.runs):
            self.plot.value = styled(runs_chart_svg(self.runs.frame, self.runs.metric_column()))
