"""The panel's tabs for a 100-layer model in JupyterLab at 1400x900 with the file browser open,
in the light and the dark theme, measured on the rendered page.

A notebook (written to the server's folder) builds a ResNet-shaped CNN with 100 report rows
(49 convs, each followed by a BatchNorm that is folded into it, a LayerNorm kept FP32
and a head, long module names), opens ``wb.panel`` on it without ``eval_fn`` and runs it
once. In the browser, for every tab in both themes:

- every visible text of the panel reaches WCAG AA contrast (4.5:1, 3:1 for large text),
  computed from the rendered colours (the text's colour or SVG fill, its opacity, and the
  backgrounds behind it composited up to the first opaque one); disabled controls are exempt,
  as WCAG exempts them;
- no chart text is smaller than 11 px on screen;
- nothing scrolls sideways: no element of the panel is wider than its scroll box, and the
  panel fits the notebook.

Then: the Sensitivity tab's chart (computed by its button, without eval_fn) has a bar of
non-zero width per quantized layer and says what it ranks by; the storage bars' widths grow
with the bytes they stand for (one scale); the folded BatchNorms are marked folded, after
their convs. Screenshots of each tab go to ``browser_support.screenshot_dir()``.
"""

from __future__ import annotations

import re

from browser_support import (
    NEEDS_LAB_AND_BROWSER,
    RUN_TIMEOUT_MS,
    UI_TIMEOUT_MS,
    LabServer,
    assert_readable_contrast,
    notebook_page,
    run_all_cells,
    screenshot_dir,
    switch_to_dark_theme,
    write_notebook,
)

pytestmark = NEEDS_LAB_AND_BROWSER

VIEWPORT = {"width": 1400, "height": 900}
ROWS = 100
QUANTIZED = 50  # stem conv, 48 block convs, head
TABS = ("Summary", "Layers", "Storage", "Plots", "Sensitivity", "Export & Benchmark")
MIN_CHART_TEXT_PX = 11

MODEL_CELL = '''import torch
from torch import nn

import workbench as wb


class ResidualBlock(nn.Module):
    def __init__(self, c_in, c):
        super().__init__()
        self.first_convolution = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.first_normalization = nn.BatchNorm2d(c)
        self.second_convolution = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.second_normalization = nn.BatchNorm2d(c)
        self.skip = c_in == c

    def forward(self, x):
        h = torch.relu(self.first_normalization(self.first_convolution(x)))
        h = self.second_normalization(self.second_convolution(h))
        return torch.relu(h + x) if self.skip else torch.relu(h)


class ResNetShaped(nn.Module):
    """A stem, 4 stages of 6 residual blocks (4 to 32 channels), a LayerNorm and a head:
    100 report rows."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_normalization = nn.BatchNorm2d(8)
        self.feature_extractor = nn.Module()
        widths, c_in, stages = (4, 8, 16, 32), 8, []
        for c in widths:
            blocks = [ResidualBlock(c_in if i == 0 else c, c) for i in range(6)]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.feature_extractor.residual_stages = nn.ModuleList(stages)
        self.pooled_normalization = nn.LayerNorm(32)  # kept FP32: not a quantizable layer
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem_normalization(self.stem(x)))
        for stage in self.feature_extractor.residual_stages:
            x = stage(x)
        return self.classifier(self.pooled_normalization(x.mean((2, 3))))


torch.manual_seed(0)
torch.set_num_threads(1)  # small convolutions: threads only contend
deep = ResNetShaped().eval()
with torch.no_grad():
    for m in deep.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
calib = [torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))]
app = wb.panel(deep, calib)
app.run_button.click()
assert app.error == "", app.error
app.sensitivity_button.click()
assert app.error == "", app.error
app'''


# Elements of the panel that would scroll sideways, and how far the panel sticks out.
OVERFLOW_JS = """
(root, notebook) => {
  const wide = [];
  for (const el of root.querySelectorAll('*')) {
    const style = getComputedStyle(el);
    if (!el.getClientRects().length || !['auto', 'scroll'].includes(style.overflowX)) { continue; }
    if (el.scrollWidth > el.clientWidth + 1) {
      const right = el.getBoundingClientRect().right;
      const out = Array.from(el.querySelectorAll('*')).filter(
        c => c.getBoundingClientRect().right > right + 1).slice(0, 3).map(
        c => c.tagName + '.' + String(c.className.baseVal ?? c.className).slice(-40) + ' ' +
             (c.textContent || '').trim().slice(0, 30));
      wide.push(String(el.className.baseVal ?? el.className).slice(-30) + ' ' +
                el.scrollWidth + '>' + el.clientWidth + ': ' + out.join(' | '));
    }
  }
  const panel = root.getBoundingClientRect().right;
  const room = notebook.getBoundingClientRect().right;
  return {wide, sticksOut: panel - room};
}
"""


def open_tab(panel, title: str):
    """Click the panel's tab and wait until its page shows something."""
    panel.locator(".lm-TabBar-tab", has_text=re.compile(f"^{re.escape(title)}$")).click()
    page_box = panel.locator(
        ".widget-tab-contents > .widget-box:visible, "
        ".widget-tab-contents > .jupyter-widgets:visible"
    ).first
    page_box.wait_for(timeout=UI_TIMEOUT_MS)
    return page_box


def check_contrast_and_size(output, where: str) -> int:
    texts = assert_readable_contrast(output, where)
    small = [t for t in texts if t["svg"] and t["size"] < MIN_CHART_TEXT_PX - 0.01]
    assert small == [], f"{where}: chart text under {MIN_CHART_TEXT_PX} px: {small[:8]}"
    return len(texts)


def check_no_sideways_scroll(output, notebook, where: str) -> None:
    found = output.evaluate(OVERFLOW_JS, notebook.element_handle())
    assert found["wide"] == [], f"{where}: scrolls sideways: {found['wide']}"
    assert found["sticksOut"] <= 1, f"{where}: the panel is wider than the notebook"


def check_sensitivity(panel) -> None:
    chart = panel.locator(".jp-WorkbenchReport-sensChart svg:visible")
    chart.wait_for(timeout=RUN_TIMEOUT_MS)
    widths = [
        float(w)
        for w in panel.locator(".jp-WorkbenchReport-sensBar:visible").evaluate_all(
            "bars => bars.map(b => b.getBBox().width)"
        )
    ]
    assert len(widths) == QUANTIZED and min(widths) > 1.0, widths
    caption = panel.locator(".jp-WorkbenchReport-caption:visible").inner_text()
    assert "No eval_fn given" in caption and "SQNR" in caption
    rows = panel.locator(".jp-WorkbenchReport-sensTable tbody tr:visible")
    assert rows.count() == QUANTIZED


def check_storage(panel) -> None:
    rows = panel.locator(".jp-WorkbenchReport-storageRow:visible")
    assert rows.count() == ROWS + 1  # and the total
    measured = rows.evaluate_all(
        """rows => rows.filter(r => r.dataset.status !== 'total').map(r => [
             r.dataset.layer, r.dataset.status, Number(r.dataset.fp32Bytes),
             r.querySelector('.jp-WorkbenchReport-fp32Bar').getBoundingClientRect().width,
             r.querySelector('.jp-WorkbenchReport-badge') ?
               r.querySelector('.jp-WorkbenchReport-badge').textContent : ''])"""
    )
    by_bytes = sorted((fp32, width) for _, _, fp32, width, _ in measured)
    widths = [width for _, width in by_bytes]
    # one linear scale: width = bytes x (full width / largest bytes), to the pixel
    full = widths[-1] / by_bytes[-1][0]
    for fp32, width in by_bytes:
        assert abs(width - max(fp32 * full, 3.0)) <= 1.5, (fp32, width, full)
    assert widths[-1] > 8 * widths[len(widths) // 2]  # sizes differ, and it shows
    names = [name for name, *_ in measured]
    folded = [name for name, status, _, _, badge in measured if badge == "folded"]
    assert len(folded) == QUANTIZED - 1 and all("normalization" in n for n in folded)
    kept = [name for name, status, _, _, badge in measured if badge == "FP32"]
    assert kept == ["pooled_normalization"]
    for name in folded:  # each BatchNorm right after its conv, in model order
        before = names[names.index(name) - 1]
        assert before.rsplit(".", 1)[0] == name.rsplit(".", 1)[0] or before == "stem"


def test_panel_tabs_at_100_layers_readable_in_both_themes(lab_server: LabServer):
    shots = screenshot_dir()
    write_notebook(lab_server.root_dir / "panel.ipynb", MODEL_CELL)
    with notebook_page(lab_server, "panel.ipynb", VIEWPORT, "panel-failure.png") as (
        page,
        notebook,
    ):
        if not page.locator("#filebrowser").is_visible():  # the sidebar open, as users have it
            page.locator(".lm-TabBar-tab[data-id='filebrowser']").click()
        run_all_cells(page, notebook)
        cell = notebook.locator(".jp-Cell").first
        panel = cell.locator(".jp-Cell-outputArea .jp-OutputArea-output").first
        panel.locator(".lm-TabBar-tab").first.wait_for(timeout=RUN_TIMEOUT_MS)
        panel.locator(".jp-WorkbenchReport-cards").first.wait_for(timeout=RUN_TIMEOUT_MS)
        summary = panel.locator(".jp-WorkbenchReport-cards").first.inner_text()
        assert f"{QUANTIZED - 1} folded, 1 kept FP32" in summary, summary
        notebook_box = notebook.locator(".jp-WindowedPanel-outer, .jp-Notebook").first
        checked = 0
        for theme in ("light", "dark"):
            if theme == "dark":
                switch_to_dark_theme(page)
            for title in TABS:
                open_tab(panel, title)
                if title == "Sensitivity":
                    check_sensitivity(panel)
                if title == "Storage" and theme == "light":
                    check_storage(panel)
                page.wait_for_timeout(300)
                where = f"{title} tab, {theme} theme"
                checked += check_contrast_and_size(panel, where)
                check_no_sideways_scroll(panel, notebook_box, where)
                # the tab bar at the top of the window, the tab's page below it
                panel.locator(".lm-TabBar").first.evaluate(
                    "el => el.scrollIntoView({block: 'start'})"
                )
                page.wait_for_timeout(200)
                slug = re.sub(r"\W+", "-", title.lower()).strip("-")
                page.screenshot(path=str(shots / f"panel-{slug}-{theme}.png"))
        assert checked > 500  # the checks saw the panel's text, not an empty page
