"""QuantConfig presets: each configures what it says, and ptq then does it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.engine.placement.layers import iter_quantized_layers

PRESETS = {
    # name: (weight scheme, activation scheme)
    "int8": (wb.Scheme(8, True, True, 0), wb.Scheme(8, False, False)),
    "int8-per-tensor": (wb.Scheme(8, True, False), wb.Scheme(8, False, False)),
    "int8-weight-only": (wb.Scheme(8, True, True, 0), None),
    "int4-weight": (wb.Scheme(4, True, True, 0), wb.Scheme(8, False, False)),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_schemes(name):
    config = wb.QuantConfig.preset(name)
    weight, activation = PRESETS[name]
    assert config.weight == weight
    assert config.activation == activation
    assert config.observer == "minmax"
    assert config.exclude == ()


def test_default_config_is_the_int8_preset():
    assert wb.QuantConfig() == wb.QuantConfig.preset("int8")


def test_preset_overrides_and_frozen():
    config = wb.QuantConfig.preset("int4-weight", observer="entropy", exclude="head")
    assert config.observer == "entropy" and config.exclude == ("head",)
    assert config.weight.bits == 4
    assert wb.QuantConfig.preset("int4-weight").observer == "minmax"  # the preset is untouched
    with pytest.raises(AttributeError):
        config.observer = "mse"  # type: ignore[misc]


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    data = [torch.randn(32, 16) for _ in range(3)]
    return model, data


@pytest.mark.parametrize("name", list(PRESETS))
def test_ptq_applies_the_preset(name):
    model, data = model_and_data()
    weight_scheme, activation_scheme = PRESETS[name]
    res = wb.ptq(model, data, config=name, progress=False)
    layers = dict(iter_quantized_layers(res.model))
    assert set(layers) == {"0", "2"}
    for layer_name, layer in layers.items():
        weight = layer.layer.weight.detach()
        wq = layer.weight_quantizer
        assert wq.scheme == weight_scheme
        if weight_scheme.per_channel:
            expected = weight.abs().amax(dim=1) / weight_scheme.quant_max
        else:
            expected = weight.abs().max() / weight_scheme.quant_max
        torch.testing.assert_close(wq.scale, expected)
        quantized = layer.quantized_weight().detach()
        codes = quantized / wq.scale.reshape(-1, 1) if weight_scheme.per_channel else None
        if codes is not None:
            torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
            assert int(codes.round().abs().max()) <= weight_scheme.quant_max
            # at most 2^b distinct values per output channel
            assert max(len(torch.unique(row)) for row in quantized) <= 2**weight_scheme.bits
        if activation_scheme is None:
            assert layer.input_quantizer is None
        else:
            assert layer.input_quantizer.scheme == activation_scheme
            assert float(layer.input_quantizer.scale) > 0
        row = res.report.layers.set_index("layer").loc[layer_name]
        assert row["bits"] == weight_scheme.bits
        assert row["scheme"] == weight_scheme.describe()
        assert row["num_scales"] == (weight.shape[0] if weight_scheme.per_channel else 1)
    if activation_scheme is None:
        assert res.report.layers["input_scale"].isna().all()
        # weight-only: the model equals the FP32 model run with the dequantized weights
        x = torch.randn(5, 16)
        w0, w2 = layers["0"].quantized_weight(), layers["2"].quantized_weight()
        with torch.no_grad():
            hidden = torch.relu(nn.functional.linear(x, w0, model[0].bias))
            expected = nn.functional.linear(hidden, w2, model[2].bias)
            torch.testing.assert_close(res.model(x), expected)


def test_weight_observer_mse_shrinks_ranges_with_an_outlier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 8)).eval()
    data = [torch.randn(4, 512)]
    with torch.no_grad():
        model[0].weight[0, 0] = 0.2  # 4.5x the largest of the other weights
    config = wb.QuantConfig.preset("int4-weight", weight_observer="mse")
    res = wb.ptq(model, data, config=config, progress=False)
    minmax = wb.ptq(model, data, config="int4-weight", progress=False)
    mse_scale = res.model[0].weight_quantizer.scale
    minmax_scale = minmax.model[0].weight_quantizer.scale
    assert float(mse_scale[0]) < float(minmax_scale[0])
    assert bool((mse_scale <= minmax_scale + 1e-9).all())
    mse_rows = res.report.layers.set_index("layer")
    minmax_rows = minmax.report.layers.set_index("layer")
    assert mse_rows.loc["0", "weight_mse"] < minmax_rows.loc["0", "weight_mse"]


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse", "entropy"])
def test_every_observer_calibrates(observer):
    model, data = model_and_data()
    res = wb.ptq(
        model, data, config=wb.QuantConfig.preset("int8", observer=observer), progress=False
    )
    layer = res.model[0]
    everything = torch.cat(data)
    scale = float(layer.input_quantizer.scale)
    minmax_scale = float(everything.max() - everything.min()) / 255
    assert 0 < scale <= minmax_scale * 1.001
    assert res.report.summary["config"].endswith(f"observer {observer}")
