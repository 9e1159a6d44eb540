"""The panel's result tabs: Summary, Layers and Storage show the report's own view (the
JupyterLab renderer where the extension is installed, the same styled HTML elsewhere);
Plots draws the report's figures as SVG (crisp, transparent, the report's bands), only when
the tab is open."""

from __future__ import annotations

import ipywidgets as widgets

from workbench.notebook.display import figure_svg

TITLES = ("Summary", "Layers", "Storage", "Plots")
SECTIONS = {"Summary": ("summary",), "Layers": ("chart", "layers"), "Storage": ("storage",)}
PLOTS_PAGE = TITLES.index("Plots")


def show_view(output: widgets.Output, view) -> None:
    """Replace what ``output`` shows by ``view`` (anything IPython can display)."""
    output.outputs = ()
    output.append_display_data(view)


class ReportTabs:
    """The widgets of the four result pages and what they show of a report."""

    def __init__(self) -> None:
        self.views = {title: widgets.Output() for title in SECTIONS}
        # hidden until drawn: an empty Image shows a broken-image icon
        self.sqnr_plot = widgets.Image(format="svg+xml", layout=widgets.Layout(display="none"))
        self.storage_plot = widgets.Image(format="svg+xml", layout=widgets.Layout(display="none"))
        self.pages = [*self.views.values(), widgets.VBox([self.sqnr_plot, self.storage_plot])]
        self._report = None
        self._plots_stale = False

    def show(self, report, plots_open: bool) -> None:
        self._report = report
        for title, sections in SECTIONS.items():
            show_view(self.views[title], report.view(*sections))
        self._plots_stale = True
        if plots_open:
            self.draw_plots()

    def draw_plots(self) -> None:
        if self._report is None or not self._plots_stale:
            return
        self.sqnr_plot.value = figure_svg(self._report.plot_sqnr())
        self.storage_plot.value = figure_svg(self._report.plot_storage())
        self.sqnr_plot.layout.display = self.storage_plot.layout.display = None
        self._plots_stale = False
