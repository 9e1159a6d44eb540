"""The report's text/html fallback (classic notebook, VS Code, nbval, GitHub: wherever the
JupyterLab extension is absent) in a real browser: the same layers and sizes as the
interactive view, and model-supplied names shown as text."""

from __future__ import annotations

import pytest
import torch
from browser_support import CHROMIUM, CHROMIUM_ARGS, missing_browser_tools
from torch import nn

pytestmark = pytest.mark.skipif(
    missing_browser_tools(need_node=False) is not None,
    reason=str(missing_browser_tools(need_node=False)),
)

HOSTILE_NAME = "<img src=x onerror=alert(1)>"


def hostile_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(HOSTILE_NAME, nn.Linear(8, 6))
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(6, 3))
    return model


def test_html_fallback_shows_layers_and_sizes_as_text(tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    import workbench as wb

    model = hostile_model()
    calib = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    result = wb.ptq(model, calib, progress=False)
    page_html = result._repr_mimebundle_()["text/html"]
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())

    dialogs: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.set_content(f"<!doctype html><html><body>{page_html}</body></html>")
            report = page.locator(".workbench-report")
            size_card = report.locator(".jp-WorkbenchReport-card").first.inner_text()
            assert f"{fp32_bytes} B \u2192 " in size_card, size_card

            layers_table = report.locator("table.jp-WorkbenchReport-layerTable")
            layer_names = layers_table.locator("tbody tr td:first-child").all_inner_texts()
            assert layer_names == [HOSTILE_NAME, "head"]
            storage_names = report.locator(
                ".jp-WorkbenchReport-storageRow .jp-WorkbenchReport-layerName"
            ).all_inner_texts()
            assert storage_names == [HOSTILE_NAME, "head", "total"]
            bars = report.locator(".jp-WorkbenchReport-sqnrBar")
            assert [bars.nth(i).get_attribute("data-layer") for i in range(2)] == [
                HOSTILE_NAME,
                "head",
            ]
            assert page.locator("img").count() == 0
            page.screenshot(path=str(tmp_path / "html-fallback.png"), full_page=True)
        finally:
            browser.close()
    assert dialogs == []
