"""Dynamic activation quantization in the simulated model: the preset, the config checks, PTQ
with and without calibration data, and what each layer computes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from workbench.core.dynamic_quant import dynamic_qparams
from workbench.engine.placement.layers import iter_quantized_layers
from workbench.engine.quantizers.dynamic import DynamicActivationQuantizer


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)
    ).eval()


def reference_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """An independent formula: uint8 input with DynamicQuantizeLinear's qparams (written out
    here), int8 symmetric per-row weight (max|w| / 127), FP32 bias."""
    x = x.detach()
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255 if high > low else 1.0
    zero_point = round(min(max(-low / scale, 0), 255))
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    x_dq = (codes - zero_point) * scale
    w_scale = layer.weight.abs().amax(dim=1, keepdim=True) / 127
    w_dq = torch.clamp(torch.round(layer.weight / w_scale), -128, 127) * w_scale
    return F.linear(x_dq, w_dq, layer.bias)


def test_preset_is_dynamic_uint8_with_int8_per_channel_weights():
    config = wb.QuantConfig.preset("int8-dynamic")
    assert config.activation_mode == "dynamic" and config.dynamic
    assert config.weight == wb.QuantConfig.preset("int8").weight
    assert config.activation == wb.Scheme(8, symmetric=False, per_channel=False)
    assert "dynamic" in config.describe()
    assert wb.QuantConfig().activation_mode == "static"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation_mode": "runtime"}, "unknown activation_mode"),
        ({"activation_mode": "dynamic", "activation": None}, "int8-dynamic"),
        (
            {"activation_mode": "dynamic", "activation": wb.Scheme(4, False, False)},
            "DynamicQuantizeLinear",
        ),
        (
            {"activation_mode": "dynamic", "activation": wb.Scheme(8, True, False)},
            "DynamicQuantizeLinear",
        ),
        (
            {
                "activation_mode": "dynamic",
                "overrides": {"fc": {"activation": wb.Scheme(6, False, False)}},
            },
            "overrides",
        ),
        (
            {"activation_mode": "dynamic", "weight": wb.Scheme(4, True, True, group_size=32)},
            "group_size",
        ),
    ],
)
def test_bad_dynamic_configs_are_one_clear_error(kwargs, match):
    with pytest.raises(wb.ConfigError, match=match):
        wb.QuantConfig(**kwargs)


def test_ptq_without_data_quantizes_each_input_with_its_own_scale():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    result = wb.ptq(model, wb.QuantConfig.preset("int8-dynamic"))  # no calibration data
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])  # the user's model is untouched
    layers = dict(iter_quantized_layers(result.model))
    assert all(isinstance(q.input_quantizer, DynamicActivationQuantizer) for q in layers.values())
    torch.manual_seed(1)
    for magnitude in (0.01, 1.0, 300.0):  # no fixed range: every input gets its own grid
        x = torch.randn(5, 12) * magnitude
        hidden = torch.relu(reference_linear(model[0], x))
        expected = reference_linear(model[2], hidden)
        got = result.model(x)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * magnitude)
        error = (got - model(x)).norm() / model(x).norm()
        assert error < 0.05
    assert math.isnan(result.report.summary["model_output_cosine"])  # nothing measured


def test_the_bias_stays_fp32():
    model = mlp()
    result = wb.ptq(model, config="int8-dynamic")
    first = dict(iter_quantized_layers(result.model))["0"]
    assert torch.equal(first.layer.bias, model[0].bias)


def test_with_data_the_report_has_per_layer_errors():
    model = mlp()
    data = [torch.randn(8, 12) for _ in range(3)]
    result = wb.ptq(model, data, config="int8-dynamic", progress=False)
    layers = result.report.layers.set_index("layer")
    assert layers.loc[["0", "2"], "output_sqnr_db"].gt(20).all()
    assert layers.loc[["0", "2"], "activation_bits"].tolist() == [8, 8]
    assert layers.loc[["0", "2"], "input_scale"].isna().all()  # no stored input scale
    assert result.report.summary["model_output_cosine"] > 0.99
    # the same data through dynamic quantization keeps at least the static minmax cosine of an
    # input whose range varies from batch to batch
    varied = [torch.randn(8, 12) * scale for scale in (0.1, 1.0, 20.0)]
    static = wb.ptq(model, varied, config="int8", progress=False)
    dynamic = wb.ptq(model, varied, config="int8-dynamic", progress=False)
    assert (
        dynamic.report.summary["model_output_sqnr_db"]
        > static.report.summary["model_output_sqnr_db"]
    )


def test_convs_keep_fp32_inputs_with_the_reason():
    model = small_cnn()
    x = torch.randn(4, 3, 8, 8)
    result = wb.ptq(model, [x], config="int8-dynamic", progress=False)
    layers = result.report.layers.set_index("layer")
    assert layers.loc["0", "status"] == "quantized"
    assert "ConvInteger" in layers.loc["0", "reason"]
    assert pd_na(layers.loc["0", "activation_bits"])
    assert layers.loc["4", "activation_bits"] == 8
    conv = dict(iter_quantized_layers(result.model))["0"]
    assert conv.input_quantizer is None and conv.output_quantizer is None
    assert not any(
        isinstance(m, wb_activation_quantizer()) and not m.dynamic for m in result.model.modules()
    )  # no static quantizer anywhere
    assert layers.loc["1", "folded_into"] == "0"  # with data, BatchNorm still folds


def test_without_data_batchnorm_stays_and_the_input_scale_follows_the_input():
    model = small_cnn()
    result = wb.ptq(model, config="int8-dynamic")
    x = torch.randn(2, 3, 8, 8)
    linear = dict(iter_quantized_layers(result.model))["4"]
    seen = {}
    handle = linear.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    result.model(x)
    handle.remove()
    scale, zero_point = dynamic_qparams(seen["x"])
    codes = linear.input_quantizer(seen["x"]) / scale + zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the input's own grid
    assert torch.allclose(result.model(x), model(x), rtol=0.05, atol=0.05)


def test_static_without_data_is_one_clear_error():
    with pytest.raises(wb.CalibrationError, match="int8-dynamic"):
        wb.ptq(mlp(), None, config="int8")


def test_data_refinements_without_data_are_one_clear_error():
    config = wb.QuantConfig.preset("int8-dynamic", bias_correction=True)
    with pytest.raises(wb.ConfigError, match="calib_data"):
        wb.ptq(mlp(), config)


def test_qat_with_dynamic_activations_is_one_clear_error():
    data = [(torch.randn(8, 12), torch.randint(0, 4, (8,)))]
    with pytest.raises(wb.ConfigError, match=r"wb\.ptq"):
        wb.qat(mlp(), data, config="int8-dynamic", loss_fn=nn.CrossEntropyLoss(), epochs=1)


def pd_na(value) -> bool:
    import pandas as pd

    return value is pd.NA or (isinstance(value, float) and math.isnan(value))


def wb_activation_quantizer():
    from workbench.engine.quantizers.modules import ActivationQuantizer

    return ActivationQuantizer
