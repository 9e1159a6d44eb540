"""The option table (``notebook/options.py``) and what is generated from it: for each option
the ``%quantize`` line, the ``%%quantize`` recipe and the panel give the QuantConfig / the
training keywords written out by hand."""

from __future__ import annotations

import dataclasses

import pytest
from digits_models import tiny_cnn

import workbench as wb
from workbench.engine.training.options import TrainingOptions
from workbench.notebook.magic_args import OPTION_KEYS, parse_line
from workbench.notebook.option_spec import CONFIG, SCHEME, TRAINING
from workbench.notebook.options import OPTIONS
from workbench.notebook.panel import WorkbenchPanel
from workbench.notebook.recipe import make_recipe, recipe_from_yaml

INT8 = wb.QuantConfig.preset("int8")

# (line words, recipe text, panel controls, the config written out by hand)
CASES = [
    ("--bits 4", "bits: 4", {"bits": 4}, wb.Scheme(4, True, True, 0)),
    ("--per-tensor", "per_tensor: true", {"per_channel": False}, wb.Scheme(8, True, False)),
    ("--asymmetric", "symmetric: false", {"symmetric": False}, wb.Scheme(8, False, True, 0)),
    ("--observer entropy", "observer: entropy", {"observer": "entropy"}, {"observer": "entropy"}),
    ("--equalize", "equalize: true", {"equalize": True}, {"equalize": True}),
    ("--smoothquant 0.5", "smoothquant: 0.5", {"smoothquant": 0.5}, {"smoothquant": 0.5}),
    (
        "--bias-correction analytic",
        "bias_correction: analytic",
        {"bias_correction": "analytic"},
        {"bias_correction": "analytic"},
    ),
    (
        "--weight-method gptq --gptq-act-order",
        "weight_method: gptq\ngptq_act_order: true",
        {"weight_method": "gptq", "gptq_act_order": True},
        {"weight_method": "gptq", "gptq_act_order": True},
    ),
    ("--no-quantize-lm-head", "quantize_lm_head: false", {"quantize_lm_head": False}, None),
]


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


def expected_config(expected):
    if expected is None:
        return dataclasses.replace(INT8, quantize_lm_head=False)
    if isinstance(expected, wb.Scheme):
        return dataclasses.replace(INT8, weight=expected)
    return dataclasses.replace(INT8, **expected)


IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("line", "recipe", "controls", "expected"), CASES, ids=IDS)
def test_line_recipe_and_panel_give_the_hand_written_config(
    model, line, recipe, controls, expected
):
    want = expected_config(expected)
    assert make_recipe(parse_line(f"model --calib c {line}")).config() == want
    options = {"model": "m", "calib": "c"} | recipe_from_yaml(recipe)
    assert make_recipe(options).config() == want
    app = WorkbenchPanel(model)
    app.set_controls(**controls)
    assert app.config() == want


def test_each_option_names_a_field_of_where_it_goes():
    owners = {CONFIG: wb.QuantConfig, TRAINING: TrainingOptions, SCHEME: wb.Scheme}
    for option in OPTIONS:
        owner = owners.get(option.target)
        if owner is not None:
            assert (option.field or option.name) in {f.name for f in dataclasses.fields(owner)}
    assert set(OPTION_KEYS) == {option.name for option in OPTIONS}


def test_training_options_reach_qat_and_are_checked_there():
    line = "model --method qat --train t --loss f --epochs 3 --lr 0.01"
    run = make_recipe(parse_line(line)).run_options()
    assert {k: run[k] for k in ("epochs", "lr")} == {"epochs": 3, "lr": 0.01}
    assert TrainingOptions(**{k: run[k] for k in ("epochs", "lr")}).epochs == 3
    with pytest.raises(wb.ConfigError, match="epochs must be an int >= 1"):
        TrainingOptions(epochs=0)
    with pytest.raises(wb.ConfigError, match="lr must be a number > 0"):
        TrainingOptions(lr=float("nan"))
