"""The panel's result tabs: Summary, Layers and Storage show the report's own view (the
JupyterLab renderer where the extension is installed, the same styled HTML elsewhere);
Plots shows the report view's charts (the output SQNR per layer on its bands and the storage
bars on one shared scale: HTML / SVG in the theme's colours), drawn only when the tab is
open."""

from __future__ import annotations

import ipywidgets as widgets

TITLES = ("Summary", "Layers", "Storage", "Plots")
SECTIONS = {
    "Summary": ("summary",),
    "Layers": ("chart", "layers"),
    "Storage": ("storage",),
    "Plots": ("chart", "storage"),
}
PLOTS_PAGE = TITLES.index("Plots")


def show_view(output: widgets.Output, view) -> None:
    """Replace what ``output`` shows by ``view`` (anything IPython can display)."""
    output.outputs = ()
    output.append_display_data(view)


class ReportTabs:
    """The widgets of the four result pages and what they show of a report."""

    def __init__(self) -> None:
        self.views = {title: widgets.Output() for title in SECTIONS}
        self.plots = self.views.pop("Plots")
        self.pages = [*self.views.values(), self.plots]
        self._report = None
        self._plots_stale = False

    def show(self, report, plots_open: bool) -> None:
        self._report = report
        for title, output in self.views.items():
            show_view(output, report.view(*SECTIONS[title]))
        self._plots_stale = True
        if plots_open:
            self.draw_plots()

    def draw_plots(self) -> None:
        if self._report is None or not self._plots_stale:
            return
        show_view(self.plots, self._report.view(*SECTIONS["Plots"]))
        self._plots_stale = False
