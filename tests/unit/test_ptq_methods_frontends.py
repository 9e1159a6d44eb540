"""The PTQ refinements from the notebook front ends: ``%quantize`` options and panel controls
pass the same QuantConfig fields as ``wb.QuantConfig(...)`` written out by hand."""

from __future__ import annotations

import pytest
import torch
from digits_models import tiny_cnn
from IPython.core.error import UsageError

import workbench as wb
from workbench.notebook.magic_args import parse_line
from workbench.notebook.panel import WorkbenchPanel
from workbench.notebook.recipe import make_recipe


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


def test_line_options_become_config_fields():
    options = parse_line(
        "model --calib calib --equalize --bias-correction --weight-method adaround "
        "--adaround-iterations 20"
    )
    config = make_recipe(options).config()
    expected = wb.QuantConfig(
        equalize=True, bias_correction=True, weight_method="adaround", adaround_iterations=20
    )
    assert config == expected
    assert make_recipe(parse_line("model --calib calib")).config() == wb.QuantConfig()


def test_qat_with_ptq_only_options_is_one_usage_error():
    line = "model --method qat --train train --loss loss_fn --weight-method adaround"
    with pytest.raises(UsageError, match="--weight-method"):
        make_recipe(parse_line(line))
    with pytest.raises(wb.ConfigError, match=r"apply to wb\.ptq"):
        wb.qat(
            torch.nn.Linear(4, 2), [torch.randn(8, 4)], config=wb.QuantConfig(bias_correction=True)
        )


def test_magic_runs_ptq_with_the_refinements(shell):
    result = shell.run_line_magic("quantize", "model --calib calib --equalize --bias-correction")
    assert result.report.summary["ptq_methods"] == [
        "cross-layer equalization",
        "empirical bias correction",
    ]
    quantized = result.report.layers[result.report.layers["status"] == "quantized"]
    assert quantized["bias_corrected"].all()


def test_panel_controls_set_the_config(model, digits):
    app = WorkbenchPanel(model, digits.calib_batches(2, 32))
    app.set_controls(equalize=True, bias_correction=True, weight_method="adaround")
    config = app.config()
    assert (config.equalize, config.bias_correction, config.weight_method) == (
        True,
        True,
        "adaround",
    )
    app.method.value = "qat"
    assert app.weight_method.disabled and app.bias_correction.disabled
    config = app.config()
    assert (config.equalize, config.bias_correction, config.weight_method) == (
        True,
        False,
        "nearest",
    )
