"""JupyterLab in headless Chromium: the launcher card, the starter notebook, the report view.

Starts JupyterLab on 127.0.0.1 (conftest.py), opens it with Debian's chromium driven by
Playwright, creates the notebook from the "New Quantization Notebook" launcher card, adds a
cell that quantizes a model with a layer named like an HTML tag (w4a4, its head overridden to
int8), runs everything and checks the rendered reports: one row per layer, header clicks
re-sort, the filter box, the hostile name shown as literal text, and each layer's precision
and weight / activation bits. The screenshot is left in the test's tmp_path.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    NEEDS_LAB_AND_BROWSER,
    RUN_TIMEOUT_MS,
    UI_TIMEOUT_MS,
    LabServer,
    run_all_cells,
)
from torch import nn

pytestmark = NEEDS_LAB_AND_BROWSER

HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_CELL = f"""import torch
from torch import nn

tiny = nn.Sequential()
tiny.add_module({HOSTILE_NAME!r}, nn.Linear(4, 3))
tiny.add_module("head", nn.Linear(3, 2))
tiny_calib = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
%quantize tiny --calib tiny_calib --preset w4a4 --override head=int8"""


def parameter_layers(model: nn.Module) -> list[str]:
    """Names of the modules that hold parameters of their own: the report has one row each."""
    return [
        name
        for name, module in model.named_modules()
        if name and any(True for _ in module.parameters(recurse=False))
    ]


def column_texts(report, column: str) -> list[str]:
    return report.locator(
        f"table.jp-WorkbenchReport-layerTable tbody td[data-column='{column}']"
    ).all_inner_texts()


def db_values(texts: list[str]) -> list[float]:
    """'46.6 dB' -> 46.6; a missing value ('—') -> nan."""
    values = []
    for text in texts:
        match = re.match(r"\s*(-?[\d.]+) dB", text)
        values.append(float(match.group(1)) if match else math.nan)
    return values


def test_launcher_notebook_renders_interactive_report(lab_server: LabServer, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    from workbench.demo import DigitsCNN

    dialogs: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(lab_server.lab_url())

            # the launcher card creates and opens the starter notebook
            card = page.locator(".jp-LauncherCard", has_text="New Quantization Notebook")
            card.click()
            notebook = page.locator(".jp-NotebookPanel:visible")
            notebook.locator(".jp-Cell").nth(3).wait_for()
            assert notebook.locator(".jp-Cell").count() == 4
            assert "%quantize model" in notebook.locator(".jp-Cell").nth(3).inner_text()

            # a cell below the last: a model whose first layer's name is an HTML tag
            notebook.locator(".jp-Cell").nth(3).locator(".jp-InputPrompt").click()
            page.keyboard.press("Escape")
            page.keyboard.press("b")
            page.keyboard.press("Enter")
            page.keyboard.insert_text(HOSTILE_CELL)
            page.keyboard.press("Escape")
            assert notebook.locator(".jp-Cell").count() == 5

            run_all_cells(page, notebook)
            reports = notebook.locator(".jp-WorkbenchReport")
            reports.nth(1).locator("tbody tr").first.wait_for(timeout=RUN_TIMEOUT_MS)
            assert reports.count() == 2
            assert notebook.locator(".jp-OutputArea-output[data-mime-type*='error']").count() == 0

            demo = reports.nth(0)
            # one row per parameter-holding layer of the demo CNN
            expected_layers = parameter_layers(DigitsCNN())
            assert sorted(column_texts(demo, "layer")) == sorted(expected_layers)
            assert demo.locator(".jp-WorkbenchReport-count").inner_text() == (
                f"{len(expected_layers)} of {len(expected_layers)} layers"
            )

            # the size card's FP32 figure: 4 bytes per parameter of the demo CNN
            fp32_bytes = 4 * sum(p.numel() for p in DigitsCNN().parameters())
            size_card = demo.locator(".jp-WorkbenchReport-card").first.inner_text()
            shown = re.match(r"([\d.]+) KiB \u2192 ", size_card.split("\n")[1])
            assert shown and float(shown.group(1)) == pytest.approx(fp32_bytes / 1024, rel=5e-3)

            # clicking a header sorts by it, clicking again reverses
            demo.locator("th[data-column='layer']").click()
            assert column_texts(demo, "layer") == sorted(expected_layers)
            demo.locator("th[data-column='layer']").click()
            assert column_texts(demo, "layer") == sorted(expected_layers, reverse=True)
            demo.locator("th[data-column='output_sqnr_db']").click()
            sqnr = db_values(column_texts(demo, "output_sqnr_db"))
            measured = [v for v in sqnr if not math.isnan(v)]
            assert len(measured) >= 3 and measured == sorted(measured)
            assert all(math.isnan(v) for v in sqnr[len(measured) :])  # missing values last
            assert (
                demo.locator("th[data-column='output_sqnr_db']").get_attribute("aria-sort")
                == "ascending"
            )

            # the filter keeps the layers whose name contains the text
            demo.locator("input.jp-WorkbenchReport-filter").fill("conv")
            assert sorted(column_texts(demo, "layer")) == ["conv1", "conv2"]
            demo.locator("input.jp-WorkbenchReport-filter").fill("")

            # the hostile layer name is text, not markup
            hostile = reports.nth(1)
            assert HOSTILE_NAME in column_texts(hostile, "layer")
            assert hostile.locator("img").count() == 0
            assert page.locator(".jp-WorkbenchReport img").count() == 0

            # per-layer precision: the overridden head is kept 8-bit on weights and input
            assert column_texts(hostile, "status") == ["quantized", "kept 8-bit"]
            assert column_texts(hostile, "bits") == ["4", "8"]
            assert column_texts(hostile, "activation_bits") == ["4", "8"]
            kept = hostile.locator("td[data-column='status'] .jp-WorkbenchReport-badge").nth(1)
            assert kept.get_attribute("title")  # the reason, on hover

            demo.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "quantization-notebook.png"))
            demo.screenshot(path=str(tmp_path / "report.png"))
            hostile.screenshot(path=str(tmp_path / "report-hostile-name.png"))
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print(f"screenshot: {tmp_path / 'failure.png'}")
            print(f"JupyterLab log:\n{lab_server.log_tail()}")
            raise
        finally:
            browser.close()
    assert dialogs == [], f"the page opened dialogs: {dialogs}"
