"""Every activation quantizer is a site: listed in ``report.sites``, named by ``overrides``,
following the layers around it (mixed precision, layers kept FP32).

References: the ``int8`` preset's model (bit for bit), the quantizer modules found in the
quantized model, and torch's own ``fake_quantize_per_tensor_affine`` for a site's SQNR."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.demo import load_digits_data, train_digits_cnn
from workbench.engine.quantizers.modules import ActivationQuantizer
from workbench.errors import ConfigError
from workbench.workflows.precision_search import higher_precision_config, kept_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

W8 = wb.Scheme(8, True, True)
A8 = wb.Scheme(8, False, False)
ALL_8_BIT = {"*": {"weight": W8, "activation": A8}}


class ResidualConcat(nn.Module):
    """conv -> ReLU -> conv -> ReLU, a residual add, a concat with a third conv, average
    pooling and a Linear head: sites at an add, a concat and a pool, not only after layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.r2 = nn.ReLU()
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.r1(self.c1(x))
        y = a + self.r2(self.c2(a))
        z = torch.cat([y, self.c3(y)], dim=1)
        return self.fc(self.pool(z).flatten(1))


@pytest.fixture(scope="module")
def data():
    digits = load_digits_data()
    calib = [digits.train_x[i : i + 128] for i in range(0, 512, 128)]
    return digits, calib


@pytest.fixture(scope="module")
def residual() -> nn.Module:
    torch.manual_seed(0)
    return ResidualConcat().eval()


def _quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActivationQuantizer)}


def _sites(result) -> pd.DataFrame:
    return result.report.sites.set_index("site")


@pytest.mark.parametrize("which", ["digits_cnn", "residual_concat"])
def test_every_site_overridden_to_8_bits_is_the_int8_model_bit_for_bit(which, data, residual):
    digits, calib = data
    model = train_digits_cnn(digits, epochs=1) if which == "digits_cnn" else residual
    overridden = wb.ptq(model, calib, wb.QuantConfig.preset("w4a4", overrides=ALL_8_BIT))
    int8 = wb.ptq(model, calib, "int8", progress=False)
    with torch.no_grad():
        assert torch.equal(overridden.model(digits.test_x), int8.model(digits.test_x))
    found, reference = _quantizers(overridden.model), _quantizers(int8.model)
    assert list(found) == list(reference)
    for path, quantizer in found.items():
        assert quantizer.scheme == reference[path].scheme == A8
        assert torch.equal(quantizer.scale, reference[path].scale)
    # the report lists every quantizer of the model once, with its bits
    sites = overridden.report.sites
    assert sorted(sites["quantizer"]) == sorted(found)
    assert set(sites["bits"]) == {8}
    assert sites["site"].is_unique
    if which == "residual_concat":
        kinds = dict(zip(sites["site"], sites["kind"], strict=True))
        assert kinds["add#0"] == "add output" and kinds["cat#0"] == "concat output"
        assert kinds["pool#0"] == "average pool output" and kinds["c1"] == "model input"


def test_a_site_is_matched_by_its_name(data, residual):
    _, calib = data
    config = wb.QuantConfig.preset("w4a4", overrides={"cat#0": {"activation": A8}})
    sites = _sites(wb.ptq(residual, calib, config, progress=False))
    assert sites.loc["cat#0", "bits"] == 8
    assert set(sites.drop(index="cat#0")["bits"]) == {4}
    dropped = wb.QuantConfig.preset("w4a4", overrides={"*add*": {"activation": None}})
    assert "add#0" not in _sites(wb.ptq(residual, calib, dropped, progress=False)).index


def test_a_site_follows_the_precision_of_the_layers_it_feeds(data, residual):
    _, calib = data
    config = wb.QuantConfig.preset("w4a4", overrides={"fc": {"activation": A8}})
    result = wb.ptq(residual, calib, config, progress=False)
    sites = _sites(result)
    # cat -> pool -> flatten -> fc: both feed the 8-bit fc; the add, r1 and c3's output feed
    # it through the cat, r2 through the add
    placed = ["cat#0", "pool#0", "add#0", "r1#0", "r2#0", "c3#0"]
    assert sites.loc[placed, "bits"].tolist() == [8] * 6
    # c2 and c3 read 8-bit sites (r1, the add) and share their grid: their inputs are 8-bit
    assert sites.loc[["c1", "c2", "c3"], "bits"].tolist() == [4, 8, 8]
    reasons = result.report.layers.set_index("layer")["reason"]
    assert "higher precision" in reasons["c2"] and "higher precision" in reasons["c3"]


def test_mixed_precision_and_layers_kept_fp32_switch_the_sites(data, residual):
    _, calib = data
    config = wb.QuantConfig.preset("w4a4")
    # the mixed-precision search's config for a kept layer: its fallback precision
    raised = kept_config(config, higher_precision_config(config), ["fc"])
    assert _sites(wb.ptq(residual, calib, raised, progress=False)).loc["pool#0", "bits"] == 8
    ranking = pd.DataFrame({"layer": ["fc", "c3", "c2", "c1"]})
    kept = wb.keep_most_sensitive_fp32(
        residual, calib, 1, config, sensitivity=ranking, progress=False
    )
    sites = _sites(kept)
    # nothing around the concat and the pool is quantized any more: they stay FP32
    assert "cat#0" not in sites.index and "pool#0" not in sites.index
    assert "add#0" in sites.index  # it still feeds the quantized c3


def test_a_site_sqnr_is_the_sqnr_of_its_own_rounding(data, residual):
    _, calib = data
    result = wb.ptq(residual, calib, "w4a4", progress=False)
    arriving: list[torch.Tensor] = []
    pool = result.model.pool.module  # the pooling inside its output quantizer's wrapper
    handle = pool.register_forward_hook(lambda m, a, out: arriving.append(out.detach()))
    with torch.no_grad():
        result.model(calib[0])
    handle.remove()
    row = _sites(result).loc["pool#0"]
    x = arriving[0]
    q = torch.fake_quantize_per_tensor_affine(x, row["scale"], int(row["zero_point"]), 0, 15)
    expected = 10 * math.log10(float((x.double() ** 2).sum() / ((x - q).double() ** 2).sum()))
    # the same tensor rounded by torch's kernel, sums in float64: only the sums' order differs
    assert row["sqnr_db"] == pytest.approx(expected, rel=1e-9)
    assert row["bits"] == 4
    assert row["scale"] == float(result.model.pool.output_quantizer.scale)


def test_the_sites_are_a_table_of_the_json_and_html_report(data, residual, tmp_path):
    _, calib = data
    result = wb.ptq(residual, calib, "int8", progress=False)
    table = result.report.to_json()["tables"]["Quantizer sites"]
    assert [row[0] for row in table["rows"]] == list(result.report.sites["site"])
    result.report.to_html(tmp_path / "report.html")
    assert "cat#0" in (tmp_path / "report.html").read_text()


def test_a_pattern_naming_neither_a_layer_nor_a_site_is_an_error_listing_both(data, residual):
    _, calib = data
    config = wb.QuantConfig.preset("w4a4", overrides={"kat#0": {"activation": A8}})
    with pytest.raises(ConfigError, match=r"'kat#0' matches no layer.*site names.*cat#0"):
        wb.ptq(residual, calib, config, progress=False)


def test_a_weight_only_model_has_no_sites(data, residual):
    _, calib = data
    result = wb.ptq(residual, calib, "int8-weight-only", progress=False)
    assert result.report.sites.empty and list(result.report.sites.columns)
