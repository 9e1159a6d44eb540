"""The panel's per-layer precision chooser, driven headless: select layers, pick a preset (or
FP32, or the config's), Set; Run quantizes with those ``QuantConfig.overrides``.

Reference: ``wb.ptq`` with the config written out by hand.
"""

from __future__ import annotations

import pytest
import torch
from digits_models import tiny_cnn

import workbench as wb
from workbench.notebook.magic_args import parse_line
from workbench.notebook.recipe import make_recipe

INT8 = wb.QuantConfig.preset("int8")
KEPT_8_BIT = {"weight": INT8.weight, "activation": INT8.activation}


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


@pytest.fixture
def app(model, digits):
    app = wb.panel(model, digits.calib_batches(2, 32))
    app.preset.value = "w4a4"
    return app


def choose(app, names: tuple[str, ...], precision: str) -> None:
    chooser = app.layer_precision
    chooser.layers.value = names
    chooser.precision.value = precision
    chooser.set_button.click()


def labels(app) -> dict[str, str]:
    return {value: label for label, value in app.layer_precision.layers.options}


def test_layers_set_to_int8_run_as_the_hand_written_overrides(app, model, digits):
    choose(app, ("conv", "fc1"), "int8")
    assert app.layer_precision.presets == {"conv": "int8", "fc1": "int8"}
    assert labels(app) == {"conv": "conv: int8", "fc1": "fc1: int8", "fc2": "fc2"}
    expected = wb.QuantConfig.preset("w4a4", overrides={"conv": KEPT_8_BIT, "fc1": KEPT_8_BIT})
    assert app.config() == expected
    app.run_button.click()
    assert app.error == ""
    layers = app.result.report.layers.set_index("layer")
    assert list(layers.loc[["conv", "fc1", "fc2"], "precision"]) == [
        "kept 8-bit",
        "kept 8-bit",
        "quantized",
    ]
    assert list(layers.loc[["conv", "fc1", "fc2"], "weight_bits"]) == [8, 8, 4]
    direct = wb.ptq(model, digits.calib_batches(2, 32), expected, progress=False)
    with torch.no_grad():
        assert torch.equal(app.result.model(digits.test_x), direct.model(digits.test_x))
    assert app.runs.frame["layer_overrides"].tolist() == ["conv: W8A8, fc1: W8A8"]
    assert "Per-layer" in app.runs_html.value


def test_fp32_is_the_keep_fp32_list_and_config_undoes_a_choice(app):
    choose(app, ("fc1",), "int8")
    choose(app, ("fc1", "fc2"), "FP32")
    assert app.keep_fp32.value == ("fc1", "fc2")
    assert app.layer_precision.presets == {}
    assert labels(app)["fc2"] == "fc2: FP32"
    assert app.config() == wb.QuantConfig.preset("w4a4", exclude=("fc1", "fc2"))
    choose(app, ("fc2",), "int8-per-tensor")  # a preset takes the layer out of FP32
    assert app.keep_fp32.value == ("fc1",)
    assert labels(app)["fc2"] == "fc2: int8-per-tensor"
    choose(app, ("fc2",), "config")
    assert app.layer_precision.presets == {} and labels(app)["fc2"] == "fc2"
    app.keep_fp32.value = ()  # the keep-FP32 list is the same choice: the labels follow
    assert labels(app)["fc1"] == "fc1"


def test_a_layer_kept_fp32_in_the_list_drops_its_preset_from_the_config(app):
    choose(app, ("fc1",), "int8")
    app.keep_fp32.value = ("fc1",)
    assert labels(app)["fc1"] == "fc1: FP32"
    assert app.config() == wb.QuantConfig.preset("w4a4", exclude=("fc1",))


def test_an_unknown_layer_is_one_config_error(app):
    with pytest.raises(wb.ConfigError, match="nope is not a quantizable layer of this model"):
        app.layer_precision.set(["nope"], "int8")


def test_the_magic_sets_the_chooser_from_override_and_exclude(shell):
    line = "model --calib calib --preset w4a4 --override 'fc*=int8' conv=int8 --exclude fc2"
    app = shell.run_line_magic("quantize", f"{line} --panel")
    assert app.layer_precision.presets == {"fc1": "int8", "fc2": "int8", "conv": "int8"}
    assert app.keep_fp32.value == ("fc2",)
    assert labels(app)["fc2"] == "fc2: FP32"
    # the panel's config is the one the same line runs without --panel (fc2 FP32 either way)
    ran = make_recipe(parse_line(line)).config()
    assert app.config().exclude == ran.exclude == ("fc2",)
    schemes = {name: app.config().schemes_for(name) for name in ("conv", "fc1")}
    assert schemes == {name: ran.schemes_for(name) for name in ("conv", "fc1")}
