"""The styled report view (text/html fallback, panel tabs, standalone file): what a reader
sees has units and no NaN / <NA> / scientific notation, the worst layers are listed only
when some are below the good band, the storage legend lists only pieces that exist, and the
standalone page needs no network."""

from __future__ import annotations

import html.parser
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.analysis.html.format import format_bytes, significant
from workbench.analysis.html.view import report_view_html, shorten_middle
from workbench.analysis.report_json import REPORT_MIME_TYPE
from workbench.analysis.sqnr_bands import SQNR_GOOD_DB, SQNR_POOR_DB

REPO = Path(__file__).resolve().parents[2]


class VisibleText(html.parser.HTMLParser):
    """The text a reader sees (no <style> / <script> bodies, no attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("style", "script")

    def handle_endtag(self, tag):
        self._skip -= tag in ("style", "script")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def visible_text(page: str) -> str:
    parser = VisibleText()
    parser.feed(page)
    return " ".join(parser.parts)


def body(page: str) -> str:
    """The page without its stylesheet (whose selectors name every class)."""
    return re.sub(r"<style>.*?</style>", "", page, flags=re.S)


def mlp(width: int = 16, depth: int = 6) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 3))


@pytest.fixture(scope="module")
def calib():
    return torch.randn(64, 16, generator=torch.Generator().manual_seed(1))


def top1(model: nn.Module) -> float:
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return float(100 * (model(x).argmax(1) == 0).float().mean())


@pytest.mark.parametrize("value", [103300.0, 1.033e5, 0.000123, 97.777, 0.22222, 12.5, 3.0])
def test_numbers_are_positional_with_three_significant_digits(value):
    text = significant(value)
    assert "e" not in text.lower()
    assert math.isclose(float(text.replace(",", "")), value, rel_tol=5e-3)
    decimals = text.split(".")[1] if "." in text else ""
    assert len(decimals) <= 3 or abs(value) < 0.1


def test_bytes_carry_a_unit():
    assert format_bytes(220) == "220 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(21.3 * 1024 * 1024) == "21.3 MiB"


def test_middle_shortening_keeps_siblings_apart():
    prefix = "encoder.layer.10.attention.self."
    names = [prefix + leaf for leaf in ("query", "key", "value", "output.dense")]
    short = [shorten_middle(name, 24) for name in names]
    assert len(set(short)) == len(names)
    assert all(len(s) <= 24 and s.startswith("encoder") for s in short)
    assert shorten_middle("conv1") == "conv1"


def test_view_text_has_units_and_no_missing_markers(calib):
    result = wb.ptq(mlp(), calib, eval_fn=top1, progress=False)
    page = result.report._repr_html_()
    text = visible_text(page)
    for bad in ("NaN", "nan ", "<NA>", "None", "e+0", "e-0", "->"):
        assert bad not in text, bad
    assert "top1 (eval_fn)" in text
    # every dB figure the table shows is one of the layers' output SQNRs, rounded
    layers = result.report.layers
    measured = layers["output_sqnr_db"].dropna().astype(float)
    shown = [float(v) for v in re.findall(r"(-?\d+\.\d) dB", text)]
    for value in measured:
        assert round(value, 1) in shown
    # one table row per layer, the chart one bar per layer
    assert page.count('<tr class="jp-WorkbenchReport-fp32"') + page.count("<tr data-status") == len(
        layers
    )
    assert page.count('<rect class="jp-WorkbenchReport-sqnrBar ') == len(layers)


def test_worst_layers_listed_only_below_the_good_band(calib):
    good = wb.ptq(mlp(), calib, progress=False)
    assert good.report.layers["output_sqnr_db"].dropna().min() >= SQNR_GOOD_DB
    assert "jp-WorkbenchReport-worst" not in body(good.report._repr_html_())

    config = wb.QuantConfig(weight=wb.Scheme(2, symmetric=True, per_channel=False))
    poor = wb.ptq(mlp(), calib, config=config, progress=False)
    sqnr = poor.report.layers.dropna(subset=["output_sqnr_db"])
    below = sqnr[sqnr["output_sqnr_db"] < SQNR_GOOD_DB]
    assert len(below) > 0
    page = body(poor.report._repr_html_())
    worst = visible_text(page[page.index("jp-WorkbenchReport-worst") :].split("</div>")[0])
    first = below.sort_values("output_sqnr_db").iloc[0]
    assert re.search(rf"\b{first['layer']}\s+{first['output_sqnr_db']:.1f} dB", worst), worst


def test_storage_legend_lists_only_pieces_present(calib):
    symmetric = wb.ptq(mlp(), calib, progress=False)  # int8: symmetric weights
    legend = body(symmetric.report._repr_html_()).split("jp-WorkbenchReport-storageLegend")[1]
    legend = visible_text("<div " + legend.split("jp-WorkbenchReport-storageRows")[0])
    assert "zero points" not in legend and "weights" in legend and "scales" in legend
    config = wb.QuantConfig(weight=wb.Scheme(8, symmetric=False, per_channel=True))
    asymmetric = wb.ptq(mlp(), calib, config=config, progress=False)
    assert "zero points" in body(asymmetric.report._repr_html_()).split("storageRows")[0]


def test_sections_view_shows_only_its_sections(calib):
    from IPython.core.interactiveshell import InteractiveShell

    report = wb.ptq(mlp(), calib, progress=False).report
    data, _ = InteractiveShell.instance().display_formatter.format(report.view("storage"))
    assert data[REPORT_MIME_TYPE]["sections"] == ["storage"]
    page = body(data["text/html"])
    assert "jp-WorkbenchReport-storage" in page
    assert "jp-WorkbenchReport-cards" not in page
    assert "jp-WorkbenchReport-layerTable" not in page
    with pytest.raises(wb.ConfigError, match="unknown report sections"):
        report.view("plots")


def test_standalone_page_is_self_contained(tmp_path, calib):
    import onnxruntime

    result = wb.ptq(mlp(), calib, progress=False)
    path = tmp_path / "report.html"
    result.report.to_html(path)
    page = path.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page)  # nothing fetched
    assert "@import" not in page and "prefers-color-scheme: dark" in page
    text = visible_text(page)
    assert "model Sequential" in text
    assert f"torch {torch.__version__}" in text
    assert f"onnxruntime {onnxruntime.__version__}" in text
    assert f"workbench {wb.__version__}" in text
    assert page == page.replace("<script src", "")  # the only script is inline


def test_bands_are_the_renderers_bands():
    source = (REPO / "extension" / "src" / "format.ts").read_text()
    poor = re.search(r"SQNR_POOR_DB = ([\d.]+)", source)
    good = re.search(r"SQNR_GOOD_DB = ([\d.]+)", source)
    assert poor and good, "format.ts lost its SQNR band constants"
    assert (float(poor.group(1)), float(good.group(1))) == (SQNR_POOR_DB, SQNR_GOOD_DB)


def test_report_view_of_a_bundle_without_layers_still_renders():
    bundle = {
        "summary": {
            "config": "int8",
            "layers_quantized": 0,
            "layers_fp32": 0,
            "fp32_bytes": 0,
            "quantized_bytes": 0,
            "compression_ratio": 1.0,
            "worst_layers": [],
        },
        "layers": [],
        "storage": [],
        "tables": {},
    }
    text = visible_text(report_view_html(bundle))
    assert "0 of 0 layers" in text and "not measured" in text


def test_storage_bars_share_one_linear_scale(calib):
    """Every layer's FP32 bar is its FP32 bytes over the largest layer's: widths grow with
    bytes (a wide layer's bar is wider), not each row on its own scale."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide = nn.Linear(16, 256)
            self.norm = nn.LayerNorm(256)
            self.narrow = nn.Linear(256, 4)

        def forward(self, x):
            return self.narrow(self.norm(self.wide(x)))

    report = wb.ptq(Mixed(), calib, progress=False).report
    page = body(report._repr_html_())
    rows = re.findall(
        r'data-layer="([^"]+)" data-status="(\w+)" data-fp32-bytes="(\d+)" '
        r'data-total-bytes="(\d+)">.*?jp-WorkbenchReport-fp32Bar" style="width:([\d.]+)%"',
        page,
    )
    layers = {name: (int(fp32), float(width)) for name, status, fp32, _, width in rows}
    assert set(layers) == {"wide", "norm", "narrow", "total"}
    largest = max(fp32 for name, (fp32, _) in layers.items() if name != "total")
    for name in ("wide", "norm", "narrow"):
        fp32, width = layers[name]
        assert width == pytest.approx(100 * fp32 / largest, abs=1e-3)
    assert layers["wide"][1] > layers["narrow"][1] > layers["norm"][1]
    assert "one linear scale" in visible_text(page)


def test_folded_batchnorm_is_folded_next_to_its_conv_not_kept_fp32(calib):
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    ).eval()
    images = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    report = wb.ptq(model, images, progress=False).report
    assert report.summary["layers_folded"] == 1 and report.summary["layers_fp32"] == 0
    bundle = report.to_json()
    assert [row["layer"] for row in bundle["layers"]] == ["0", "1", "4"]
    assert [row["layer"] for row in bundle["storage"]] == ["0", "1", "4", "TOTAL"]
    page = body(report._repr_html_())
    text = visible_text(page)
    assert "1 folded, 0 kept FP32" in text and "1 kept FP32" not in text
    storage = page.split("jp-WorkbenchReport-storageRows")[1]
    folded_row = storage.split('data-layer="1"')[1].split('data-layer="4"')[0]
    assert "folded" in visible_text("<div " + folded_row) and "FP32</span>" not in folded_row
    assert 'title="1: folded into 0"' in page or "1: folded into 0</title>" in page


@pytest.mark.parametrize("value, text", [(-0.04, "0.0 dB"), (-0.06, "-0.1 dB"), (0.04, "0.0 dB")])
def test_db_never_shows_minus_zero(value, text):
    from workbench.analysis.html.format import format_db

    assert format_db(value) == text


def test_middle_shortening_keeps_the_block_numbers_of_deep_names():
    names = [
        f"feature_extractor.residual_stages.{stage}.{block}.second_convolution"
        for stage in range(4)
        for block in range(6)
    ]
    short = [shorten_middle(name, 30) for name in names]
    assert len(set(short)) == len(names) and all(len(s) == 30 for s in short)


def test_standalone_table_hides_the_chosen_columns_until_asked(tmp_path, calib):
    report = wb.ptq(mlp(), calib, progress=False).report
    report.to_html(tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    for column in ("scheme", "num_scales", "scale_range", "zero_point"):
        assert f'<th data-column="{column}" hidden=""' in page or re.search(
            rf'<th[^>]*data-column="{column}"[^>]*hidden', page
        )
        assert re.search(rf'<input type="checkbox" data-column="{column}">', page)
    assert re.search(r'<input type="checkbox" data-column="output_sqnr_db" checked>', page)
    assert not re.search(r'<td[^>]*data-column="output_sqnr_db"[^>]*hidden', page)
    # the notebook's text/html view (no script) shows every column
    assert " hidden" not in body(report._repr_html_())
