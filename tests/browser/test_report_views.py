"""The report where users are: a 100-layer model in JupyterLab at 1400x1000, light and dark,
in the panel's tabs, and as the standalone HTML file opened from disk.

A notebook (written to the server's folder) builds a 100-layer transformer-shaped model in
code, quantizes it, shows the report, writes ``report.html`` and opens a panel that has run
once. In the browser: the layer table keeps the layer names (sticky first column) and the
header visible while the SQNR columns are scrolled into view inside a 1400 px window; clicking
a bar of the SQNR chart filters the table to that layer; the dark theme darkens the view; the
panel's Summary / Layers / Storage tabs show the same report view; the standalone file works
from disk in both colour schemes. Screenshots go to ``browser_support.screenshot_dir()``.
"""

from __future__ import annotations

import re

from browser_support import (
    NEEDS_LAB_AND_BROWSER,
    RUN_TIMEOUT_MS,
    UI_TIMEOUT_MS,
    LabServer,
    assert_readable_contrast,
    chromium,
    notebook_page,
    run_all_cells,
    screenshot_dir,
    switch_to_dark_theme,
    write_notebook,
)

pytestmark = NEEDS_LAB_AND_BROWSER

VIEWPORT = {"width": 1400, "height": 1000}
LAYERS = 100
PICKED = "encoder.layer.7.attention.value"

MODEL_CELL = '''import torch
from torch import nn

import workbench as wb


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attention = nn.ModuleDict(
            {k: nn.Linear(d, d) for k in ("query", "key", "value", "output")}
        )
        self.norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        a = self.attention
        h = a["output"](a["query"](x) + 0.5 * a["key"](x) + a["value"](x))
        return self.ffn(self.norm(x + h)) + x


class Encoder(nn.Module):
    """Embedding, 14 blocks of 7 parameter layers, a head: 100 rows in the report."""

    def __init__(self, d=32, blocks=14):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([Block(d) for _ in range(blocks)])
        self.head = nn.Linear(d, 4)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.encoder.layer:
            x = block(x)
        return self.head(x.mean(1))


torch.manual_seed(0)
deep = Encoder()
calib = [torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
res = wb.ptq(deep, calib, progress=False)
res.report.to_html("report.html")
res'''

PANEL_CELL = """app = wb.panel(deep, calib)
app.run_button.click()
app"""


def check_layer_table(page, view) -> None:
    """Sticky header and first column, SQNR reachable inside the window, bounded height."""
    scroller = view.locator(".jp-WorkbenchReport-tableScroll")
    rows = view.locator("table.jp-WorkbenchReport-layerTable tbody tr")
    assert rows.count() == LAYERS
    scroller.scroll_into_view_if_needed()
    box = scroller.bounding_box()
    assert box["height"] <= 480, box
    # the default columns fit: nothing to scroll sideways (the chooser shows the others)
    widths = scroller.evaluate("el => [el.scrollWidth, el.clientWidth]")
    assert widths[0] <= widths[1] + 1, widths
    assert box["x"] + box["width"] <= VIEWPORT["width"]
    scroller.evaluate("el => { el.scrollLeft = el.scrollWidth; el.scrollTop = 400; }")
    page.wait_for_timeout(200)
    header = view.locator("th[data-column='output_sqnr_db']").bounding_box()
    assert box["x"] <= header["x"] and header["x"] + header["width"] <= box["x"] + box["width"]
    assert abs(header["y"] - box["y"]) <= 2  # the header stays at the top of the scroll area
    # the layer name of the row under the header is visible at the left edge, not scrolled off
    x, y = box["x"] + 12, header["y"] + header["height"] + 8
    hit = page.evaluate(
        "([x, y]) => { const cell = document.elementFromPoint(x, y)?.closest('td');"
        " return cell ? [cell.dataset.column, cell.textContent] : null; }",
        [x, y],
    )
    assert hit is not None and hit[0] == "layer" and hit[1].startswith(("encoder", "embed", "head"))
    sqnr_cell = view.locator("td[data-column='output_sqnr_db']").nth(20).bounding_box()
    assert sqnr_cell["x"] + sqnr_cell["width"] <= VIEWPORT["width"]
    scroller.evaluate("el => { el.scrollLeft = 0; el.scrollTop = 0; }")


def check_chart_filters_table(view) -> None:
    bars = view.locator(".jp-WorkbenchReport-sqnrBar")
    assert bars.count() == LAYERS
    view.locator(f".jp-WorkbenchReport-sqnrBar[data-layer='{PICKED}']").click()
    shown = view.locator("table.jp-WorkbenchReport-layerTable tbody tr:visible")
    # the full name on hover; the cell's text may be shortened in the middle
    assert shown.evaluate_all("rows => rows.map(r => r.dataset.layer)") == [PICKED]
    name = shown.first.locator("td[data-column='layer'] code")
    assert name.get_attribute("title") == PICKED
    text = name.inner_text()
    assert text == PICKED or (text.startswith(PICKED[:7]) and "\u2026" in text)
    assert view.locator(".jp-WorkbenchReport-count").inner_text() == f"1 of {LAYERS} layers"


def check_contrast(view, where: str) -> None:
    """Every visible text of the view at WCAG AA contrast, from the rendered colours."""
    texts = assert_readable_contrast(view, where)
    assert len(texts) > 100  # the check saw the view's text


def check_text(text: str) -> None:
    for bad in ("NaN", "<NA>", "e+0", "None"):
        assert bad not in text, bad


def test_hundred_layer_report_in_lab_panel_and_file(lab_server: LabServer):
    shots = screenshot_dir()
    write_notebook(lab_server.root_dir / "views.ipynb", MODEL_CELL, PANEL_CELL)
    with notebook_page(lab_server, "views.ipynb", VIEWPORT, "lab-failure.png") as (
        page,
        notebook,
    ):
        notebook.locator(".jp-Cell").nth(1).wait_for()
        run_all_cells(page, notebook)
        report = notebook.locator(".jp-Cell").nth(0).locator(".jp-WorkbenchReport")
        report.locator("tbody tr").first.wait_for(timeout=RUN_TIMEOUT_MS)
        panel_tabs = notebook.locator(".jp-Cell").nth(1).locator(".lm-TabBar-tab")
        panel_tabs.first.wait_for(timeout=RUN_TIMEOUT_MS)

        check_text(report.inner_text())
        check_contrast(report, "report view, light theme")
        check_layer_table(page, report)
        report.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "lab-100-layers-light.png"))
        check_chart_filters_table(report)
        page.screenshot(path=str(shots / "lab-100-layers-chart-filter-light.png"))

        # the panel's tabs show the same report view
        panel_cell = notebook.locator(".jp-Cell").nth(1)
        for title, selector in (
            ("Summary", ".jp-WorkbenchReport-cards"),
            ("Layers", "table.jp-WorkbenchReport-layerTable"),
            ("Storage", ".jp-WorkbenchReport-storageRow"),
        ):
            panel_cell.locator(".lm-TabBar-tab", has_text=re.compile(f"^{title}$")).click()
            shown = panel_cell.locator(f".jp-WorkbenchReport {selector}:visible").first
            shown.wait_for(timeout=UI_TIMEOUT_MS)
            check_text(panel_cell.inner_text())
            shown.scroll_into_view_if_needed()
            page.screenshot(path=str(shots / f"panel-{title.lower()}-light.png"))

        # dark theme: the view follows JupyterLab's theme variables
        switch_to_dark_theme(page)
        header_bg = report.locator("th").first.evaluate(
            "el => getComputedStyle(el).backgroundColor"
        )
        channels = [int(v) for v in re.findall(r"\d+", header_bg)[:3]]
        assert sum(channels) / 3 < 100, header_bg  # a dark header, not a white block
        check_contrast(report, "report view, dark theme")
        report.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "lab-100-layers-dark.png"))
        panel_cell.locator(".lm-TabBar-tab", has_text=re.compile("^Layers$")).click()
        panel_cell.locator(".jp-WorkbenchReport-chart:visible").first.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "panel-layers-dark.png"))
        panel_cell.locator(".lm-TabBar-tab", has_text=re.compile("^Plots$")).click()
        bars = panel_cell.locator(".jp-WorkbenchReport-sqnrBar:visible")
        bars.first.wait_for(timeout=RUN_TIMEOUT_MS)
        assert bars.count() == LAYERS
        page.screenshot(path=str(shots / "panel-plots-dark.png"))

    # the shared file, opened from disk, in both colour schemes
    report_file = lab_server.root_dir / "report.html"
    assert report_file.is_file()
    with chromium() as browser:
        for scheme in ("light", "dark"):
            page = browser.new_page(viewport=VIEWPORT, color_scheme=scheme)
            requests: list[str] = []
            page.on("request", lambda request, seen=requests: seen.append(request.url))
            page.goto(report_file.as_uri())
            view = page.locator(".jp-WorkbenchReport")
            text = view.inner_text()
            check_text(text)
            assert "model Encoder" in text and "torch " in text
            background = page.evaluate("getComputedStyle(document.body).backgroundColor")
            level = sum(int(v) for v in re.findall(r"\d+", background)[:3]) / 3
            assert (level < 60) if scheme == "dark" else (level > 200), background
            check_contrast(view, f"standalone file, {scheme} scheme")
            check_layer_table(page, view)
            page.screenshot(path=str(shots / f"html-file-{scheme}.png"))
            check_chart_filters_table(view)
            page.screenshot(path=str(shots / f"html-file-chart-filter-{scheme}.png"))
            assert [url for url in requests if not url.startswith("file:")] == []
            page.close()
