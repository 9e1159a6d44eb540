"""Per-layer precision: config.overrides, the quantizers around an overridden layer, the
report's precision columns and the export's codes."""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import numpy_helper

import workbench as wb
from tests.unit.digits_models import tiny_cnn
from workbench.analysis.report_json import report_to_json
from workbench.demo import accuracy, load_digits_data
from workbench.engine.placement.layers import iter_quantized_layers
from workbench.engine.quantizers.modules import ActivationQuantizer
from workbench.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

W8 = wb.Scheme(8, True, True)
A8 = wb.Scheme(8, False, False)


@pytest.fixture(scope="module")
def digits():
    data = load_digits_data()
    calib = [data.train_x[i : i + 128] for i in range(0, 512, 128)]
    return tiny_cnn(), data, calib


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"fc2": {"weights": W8}}, "unknown key 'weights'"),
        ({"fc2": {"weight": None}}, "exclude"),
        ({"fc2": {"weight": "int8"}}, "must be a Scheme"),
        ({"fc2": {"activation": wb.Scheme(8, False, True)}}, "per-tensor"),
        ({"fc2": W8}, "'weight' and / or 'activation'"),
        ({3: {"weight": W8}}, "not a layer name"),
        (["fc2"], "dict"),
    ],
)
def test_bad_overrides_are_one_config_error_naming_the_fix(overrides, names):
    with pytest.raises(ConfigError, match=names):
        wb.QuantConfig.preset("w4a4", overrides=overrides)


def test_an_override_matching_no_layer_is_an_error_naming_the_layers(digits):
    model, _, calib = digits
    config = wb.QuantConfig.preset("w4a4", overrides={"fc3": {"weight": W8}})
    with pytest.raises(ConfigError, match=r"overrides pattern 'fc3' matches no layer.*fc2"):
        wb.ptq(model, calib, config, progress=False)


def test_later_patterns_replace_the_keys_they_give():
    config = wb.QuantConfig.preset(
        "w4a4", overrides={"fc*": {"weight": W8, "activation": A8}, "fc2": {"activation": None}}
    )
    assert config.schemes_for("fc1") == (W8, A8)
    assert config.schemes_for("fc2") == (W8, None)
    assert config.schemes_for("conv") == (config.weight, config.activation)
    assert hash(config) == hash(wb.QuantConfig.preset("w4a4", overrides=dict(config.overrides)))


def test_every_layer_at_8_bits_is_the_int8_model(digits):
    model, data, calib = digits
    everything = wb.QuantConfig.preset("w4a4", overrides={"*": {"weight": W8, "activation": A8}})
    kept = wb.ptq(model, calib, everything, progress=False)
    int8 = wb.ptq(model, calib, "int8", progress=False)
    quantizers = [
        (name, module.scheme, module.scale, module.zero_point)
        for name, module in kept.model.named_modules()
        if isinstance(module, ActivationQuantizer)
    ]
    reference = [
        (name, module.scheme, module.scale, module.zero_point)
        for name, module in int8.model.named_modules()
        if isinstance(module, ActivationQuantizer)
    ]
    assert [q[:2] for q in quantizers] == [q[:2] for q in reference]
    for (_, _, scale, zero), (_, _, ref_scale, ref_zero) in zip(quantizers, reference, strict=True):
        assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    with torch.no_grad():
        assert torch.equal(kept.model(data.test_x), int8.model(data.test_x))
    assert accuracy(kept.model, data.test_x, data.test_y) == accuracy(
        int8.model, data.test_x, data.test_y
    )
    layers = kept.report.layers.set_index("layer")
    assert set(layers.loc[["conv", "fc1", "fc2"], "precision"]) == {"kept 8-bit"}
    assert list(layers.loc[["conv", "fc1", "fc2"], "weight_bits"]) == [8, 8, 8]
    assert list(layers.loc[["conv", "fc1", "fc2"], "activation_bits"]) == [8, 8, 8]
    assert layers.loc["bn", "precision"] == "folded"


def test_the_quantizers_around_an_8_bit_conv_are_8_bit(digits):
    model, _, calib = digits
    config = wb.QuantConfig.preset("w4a4", overrides={"conv": {"weight": W8, "activation": A8}})
    result = wb.ptq(model, calib, config, progress=False)
    layers = dict(iter_quantized_layers(result.model))
    assert layers["conv"].input_quantizer.scheme == A8
    # the conv's output quantizer (after its ReLU) feeds fc1 through the pooling: one
    # quantizer for both, at the higher precision, and fc1's input shares it
    source = layers["fc1"].input_quantizer.shares_scale_of
    assert source is not None
    assert result.model.get_submodule(source).scheme.bits == 8
    assert layers["fc1"].input_quantizer.scheme.bits == 8
    assert layers["fc2"].input_quantizer.scheme.bits == 4  # off the path: the config's
    table = result.report.layers.set_index("layer")
    assert table.loc["fc1", "activation_bits"] == 8 and table.loc["fc1", "weight_bits"] == 4
    assert "conv" in table.loc["fc1", "reason"] and "higher precision" in table.loc["fc1", "reason"]
    assert table.loc["fc1", "precision"] == "quantized"
    assert table.loc["conv", "precision"] == "kept 8-bit"


def test_a_layer_kept_fp32_has_no_quantizer_only_it_needs(digits):
    model, _, calib = digits
    result = wb.ptq(model, calib, wb.QuantConfig.preset("w4a4", exclude=("fc1",)), progress=False)
    names = [
        module.tensor_name
        for module in result.model.modules()
        if isinstance(module, ActivationQuantizer)
    ]
    assert not any("fc1" in name for name in names)
    # the conv still runs as QLinearConv: its output quantizer is its own
    assert any("relu1" in name or "conv" in name for name in names)
    row = result.report.layers.set_index("layer").loc["fc1"]
    assert row["precision"] == "kept FP32" and row["activation_bits"] is pd.NA


def test_an_8_bit_fc2_on_w4a4_exports_8_bit_codes_and_counts_8_bit_storage(digits, tmp_path):
    model, data, calib = digits
    config = wb.QuantConfig.preset("w4a4", overrides={"fc2": {"weight": W8}})
    result = wb.ptq(model, calib, config, progress=False)
    path = result.export_onnx(tmp_path / "mixed.onnx", data.test_x[:2], check_fusion=False)
    inits = {
        init.name: numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer
    }
    codes = {name: inits[f"{name}.weight_quantized"] for name in ("conv", "fc1", "fc2")}
    assert int(np.abs(codes["fc2"].astype(np.int32)).max()) == 127  # per-channel minmax: full
    for name in ("conv", "fc1"):
        assert codes[name].min() >= -8 and codes[name].max() <= 7
    storage = result.report.storage.set_index("layer")
    numel = {
        name: layer.layer.weight.numel() for name, layer in iter_quantized_layers(result.model)
    }
    assert storage.loc["fc2", "weight_bytes"] == numel["fc2"]
    assert storage.loc["fc1", "weight_bytes"] == -(-numel["fc1"] * 4 // 8)
    table = result.report.layers.set_index("layer")
    assert table.loc["fc2", "weight_bits"] == 8 and table.loc["fc2", "activation_bits"] == 4
    assert table.loc["fc2", "precision"] == "kept 8-bit"
    assert table.loc["fc1", "weight_bits"] == 4
    bundle = {row["layer"]: row for row in report_to_json(result.report)["layers"]}
    assert (bundle["fc2"]["weight_bits"], bundle["fc2"]["activation_bits"]) == (8, 4)
    assert bundle["fc2"]["precision"] == "kept 8-bit" and bundle["fc1"]["precision"] == "quantized"
    html = result.report._repr_html_()  # the HTML view's status badge and activation column
    assert ">kept 8-bit</span>" in html and 'data-column="activation_bits"' in html


def test_the_magic_line_and_recipe_give_the_same_overrides():
    from IPython.core.error import UsageError

    from workbench.notebook.magic_args import parse_line
    from workbench.notebook.recipe import make_recipe, recipe_from_yaml

    line = make_recipe(
        parse_line("model --calib c --preset w4a4 --override fc2=int8 'stem.*=int8-weight-only'")
    )
    cell = make_recipe(
        {"model": "model", "calib": "c"}
        | recipe_from_yaml("preset: w4a4\noverride: {fc2: int8, 'stem.*': int8-weight-only}")
    )
    int8 = wb.QuantConfig.preset("int8")
    for recipe in (line, cell):
        config = recipe.config()
        assert config.schemes_for("fc2") == (int8.weight, int8.activation)
        assert config.schemes_for("stem.0") == (int8.weight, None)
        assert config.schemes_for("fc1") == (config.weight, config.activation)
    for bad, says in (("fc2", "PATTERN=PRESET"), ("fc2=int16", "unknown preset 'int16'")):
        with pytest.raises(UsageError, match=says):
            make_recipe(parse_line(f"model --calib c --override {bad}"))
    with pytest.raises(UsageError, match="must map layer patterns to presets"):
        recipe_from_yaml("override: 3")


def test_an_8_bit_conv_in_a_w4a4_model_exports_on_its_integer_kernel(digits, tmp_path):
    from workbench.runtime.fusion_check import check_fusion

    model, data, calib = digits
    eight_bit = {"conv": {"weight": W8, "activation": A8}}
    fusion = {}
    for name, config in (
        ("w4a4", wb.QuantConfig.preset("w4a4")),
        ("mixed", wb.QuantConfig.preset("w4a4", overrides=eight_bit)),
    ):
        result = wb.ptq(model, calib, config, progress=False)
        path = result.export_onnx(tmp_path / f"{name}.onnx", data.test_x[:4], check_fusion=False)
        fusion[name] = check_fusion(path, warn=False).table.set_index("layer")
    # at 4 bits the conv runs in float (as before); at 8 bits, with its output quantizer at
    # 8 bits too, ONNX Runtime runs it as QLinearConv
    assert not fusion["w4a4"].loc["conv", "fused"]
    assert fusion["mixed"].loc["conv", "fused"]
    assert fusion["mixed"].loc["conv", "kernel"] == "QLinearConv"


def test_qat_trains_with_the_overridden_precisions(digits):
    model, data, _ = digits
    train = [(data.train_x[i : i + 128], data.train_y[i : i + 128]) for i in range(0, 256, 128)]
    config = wb.QuantConfig.preset("w4a4", overrides={"conv": {"weight": W8, "activation": A8}})
    result = wb.qat(
        model,
        train,
        config,
        loss_fn=torch.nn.functional.cross_entropy,
        epochs=1,
        lr=1e-4,
        learn_scales=True,
        progress=False,
    )
    layers = dict(iter_quantized_layers(result.model))
    assert layers["conv"].weight_quantizer.scheme == W8
    assert layers["conv"].input_quantizer.scheme == A8
    assert layers["fc1"].input_quantizer.scheme.bits == 8  # shares the conv's 8-bit output
    assert layers["fc2"].weight_quantizer.scheme.bits == 4
    table = result.report.layers.set_index("layer")
    assert table.loc["conv", "precision"] == "kept 8-bit"
    assert list(table.loc[["conv", "fc1", "fc2"], "weight_bits"]) == [8, 4, 4]
