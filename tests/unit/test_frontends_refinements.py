"""The newer PTQ options from the notebook front ends: ``--bias-correction analytic``,
``--gptq-act-order`` and ``--no-quantize-lm-head`` on the ``%quantize`` line, the same keys in
a ``%%quantize`` recipe and the panel's controls all give the QuantConfig written by hand."""

from __future__ import annotations

import pytest
import torch
from digits_models import tiny_cnn
from IPython.core.error import UsageError

import workbench as wb
from workbench.notebook.magic_args import parse_line
from workbench.notebook.panel import WorkbenchPanel
from workbench.notebook.recipe import make_recipe, recipe_from_yaml

LINE = (
    "model --calib calib --bias-correction analytic --weight-method gptq --gptq-act-order "
    "--no-quantize-lm-head"
)
RECIPE = (
    "calib: calib\nbias_correction: analytic\nweight_method: gptq\ngptq_act_order: true\n"
    "quantize_lm_head: false"
)
EXPECTED = wb.QuantConfig(
    bias_correction="analytic", weight_method="gptq", gptq_act_order=True, quantize_lm_head=False
)


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


def test_line_and_recipe_give_the_config():
    assert make_recipe(parse_line(LINE)).config() == EXPECTED
    options = parse_line("model") | recipe_from_yaml(RECIPE)
    assert make_recipe(options).config() == EXPECTED
    plain = make_recipe(parse_line("model --calib calib --bias-correction")).config()
    assert plain == wb.QuantConfig(bias_correction=True)
    assert plain.bias_correction_method == "empirical"
    defaults = make_recipe(parse_line("model --calib calib")).config()
    assert (defaults.quantize_lm_head, defaults.gptq_act_order) == (True, False)


def test_panel_controls_give_the_config(model, digits):
    app = WorkbenchPanel(model, digits.calib_batches(2, 32))
    assert app.gptq_act_order.disabled  # only with GPTQ rounding
    app.set_controls(
        bias_correction="analytic",
        weight_method="gptq",
        gptq_act_order=True,
        quantize_lm_head=False,
    )
    assert not app.gptq_act_order.disabled
    assert app.config() == EXPECTED
    app.set_controls(bias_correction="empirical", weight_method="nearest")
    config = app.config()
    assert (config.bias_correction, config.gptq_act_order) == (True, False)


def test_magic_line_and_recipe_equal_the_call(shell, model, digits):
    direct = wb.ptq(
        model,
        digits.calib_batches(4, 32),
        config=wb.QuantConfig(bias_correction="analytic"),
        progress=False,
    )
    by_line = shell.run_line_magic("quantize", "model --calib calib --bias-correction analytic")
    by_recipe = shell.run_cell_magic("quantize", "model", "calib: calib\nbias_correction: analytic")
    for result in (by_line, by_recipe):
        assert result.config == direct.config
        assert result.report.summary["ptq_methods"] == direct.report.summary["ptq_methods"]
        with torch.no_grad():
            assert torch.equal(result.model(digits.test_x), direct.model(digits.test_x))


BAD = [
    ("model --calib calib --gptq-act-order", "add --weight-method gptq"),
    ("model --calib calib --bias-correction sometimes", "invalid choice"),
    (
        "model --method qat --train train --loss loss_fn --weight-method gptq --gptq-act-order",
        "refine PTQ",
    ),
]


@pytest.mark.parametrize(("line", "message"), BAD)
def test_bad_lines_are_one_usage_error(line, message):
    with pytest.raises(UsageError, match=message):
        make_recipe(parse_line(line))


def test_bad_recipe_value_names_the_choices():
    with pytest.raises(UsageError, match="empirical or analytic"):
        recipe_from_yaml("bias_correction: sometimes")
