"""``%quantize ... --max-drop X``: the accuracy-driven mixed-precision search from the magic.

The reference is ``wb.auto_mixed_precision`` called directly with the config the options
describe (written out by hand): same layers kept, same search, same model outputs. Every
misuse is a one-line UsageError that names the fix.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from digits_models import tiny_mlp
from IPython.core.error import UsageError

import workbench as wb
from workbench.demo import accuracy

MAX_DROP = 0.5


@pytest.fixture(scope="module")
def model():
    return tiny_mlp()


@pytest.fixture(scope="module")
def reference(model, digits):
    """The search called directly: 3-bit weights, uint8 activations (the int8 preset)."""
    config = wb.QuantConfig(
        weight=wb.Scheme(3, symmetric=True, per_channel=True),
        activation=wb.Scheme(8, symmetric=False, per_channel=False),
    )
    return wb.auto_mixed_precision(
        model,
        digits.calib_batches(4, 32),
        lambda m: accuracy(m, digits.test_x, digits.test_y),
        max_drop=MAX_DROP,
        config=config,
        progress=False,
    )


def test_max_drop_runs_the_mixed_precision_search(shell, reference, digits):
    result = shell.run_line_magic(
        "quantize", f"model --calib calib --eval accuracy --bits 3 --max-drop {MAX_DROP} -o res"
    )
    assert shell.user_ns["res"] is result
    assert result.config == reference.config
    summary = result.report.summary
    kept = summary["kept_higher_precision"]
    assert kept == reference.report.summary["kept_higher_precision"]
    assert len(kept) >= 1, "at 3 bits this model needs at least one layer in higher precision"
    assert summary["max_drop"] == MAX_DROP
    search = result.report.extra_tables["Mixed-precision search"]
    pd.testing.assert_frame_equal(search, reference.report.extra_tables["Mixed-precision search"])
    assert search.iloc[0]["drop"] > MAX_DROP >= search[search["step"] != "config"]["drop"].min()
    chosen = search[search["kept"] == ", ".join(kept)].iloc[-1]
    # the report's metric is measured again on the final model: it must agree with the search
    assert summary["metric_drop"] == pytest.approx(chosen["drop"]) and chosen["drop"] <= MAX_DROP
    sensitivity = list(result.report.extra_tables["Sensitivity"]["layer"])
    assert kept == sorted(kept, key=sensitivity.index)  # most sensitive first
    layers = result.report.layers.set_index("layer")
    for name in kept:  # below 8 bits the fallback is 8-bit, so the layer stays quantized
        assert layers.loc[name, "status"] == "quantized"
        assert layers.loc[name, "reason"].startswith("kept 8-bit: sensitivity rank")
    with torch.no_grad():
        assert torch.equal(result.model(digits.test_x), reference.model(digits.test_x))


def test_max_drop_recipe_key_equals_the_line(shell, reference):
    recipe = "calib: calib\neval: accuracy\nbits: 3\nmax_drop: 0.5\n"
    result = shell.run_cell_magic("quantize", "model", recipe)
    kept = result.report.summary["kept_higher_precision"]
    assert kept == reference.report.summary["kept_higher_precision"]


def test_max_drop_with_qat_trains_with_the_precisions_the_search_chose(shell, reference):
    line = "model --method qat --train train --calib calib --loss loss_fn --eval accuracy"
    result = shell.run_line_magic("quantize", f"{line} --bits 3 --max-drop {MAX_DROP}")
    kept = reference.report.summary["kept_higher_precision"]
    assert result.method == "qat" and result.config == reference.config
    assert result.report.summary["kept_higher_precision"] == kept
    layers = result.report.layers.set_index("layer")
    for name in layers.index:
        expected = 8 if name in kept else 3
        assert layers.loc[name, "weight_bits"] == expected


def test_keep_most_sensitive_line_and_recipe_equal_the_call(shell, model, digits):
    direct = wb.keep_most_sensitive_fp32(model, digits.calib_batches(4, 32), 1, progress=False)
    top = direct.report.summary["kept_higher_precision"]
    by_line = shell.run_line_magic("quantize", "model --calib calib --keep-most-sensitive 1")
    by_recipe = shell.run_cell_magic("quantize", "model", "calib: calib\nkeep_most_sensitive: 1")
    for result in (by_line, by_recipe):
        assert result.report.summary["kept_higher_precision"] == top
        assert result.config == direct.config
        with torch.no_grad():
            assert torch.equal(result.model(digits.test_x), direct.model(digits.test_x))


def test_max_drop_with_panel_sets_the_panel_controls(shell):
    app = shell.run_line_magic(
        "quantize", "model --calib calib --eval accuracy --max-drop 0.25 --panel"
    )
    assert app.mixed_precision.value is True
    assert app.max_drop.value == 0.25
    assert app.max_drop.disabled is False


def test_help_shows_max_drop_with_an_example(shell):
    doc = shell.object_inspect("%quantize")["docstring"]
    assert "--max-drop X" in doc
    assert "--eval accuracy --bits 4 --max-drop 0.5" in doc


BAD_LINES = [
    ("model --calib calib --max-drop 0.5", "--max-drop is a drop of the --eval metric; add --eval"),
    (
        "model --calib calib --keep-most-sensitive 0",
        "argument --keep-most-sensitive: must be >= 1",
    ),
    ("model --calib calib --eval accuracy --max-drop -1", "argument --max-drop: must be >= 0"),
    ("model --calib calib --eval accuracy --max-drop lots", "invalid number >= 0 value: 'lots'"),
    ("model --calib calib --max-drop 0.5 --panel", "add --eval FN"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_max_drop_misuse_is_a_one_line_usage_error(shell, line, message):
    with pytest.raises(UsageError) as info:
        shell.run_line_magic("quantize", line)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


BAD_RECIPES = [
    ("calib: calib\neval: accuracy\nmax_drop: lots", "recipe key 'max_drop' must be a number"),
    ("calib: calib\neval: accuracy\nmax_drop: true", "recipe key 'max_drop' must be a number"),
    ("calib: calib\neval: accuracy\nmax_drop: -1", "--max-drop must be >= 0, got -1.0"),
    ("calib: calib\nmax_drop: 0.5", "add --eval FN"),
    ("calib: calib\nkeep_most_sensitive: 0", "--keep-most-sensitive must be >= 1, got 0"),
    ("calib: calib\nkeep_most_sensitive: one", "'keep_most_sensitive' must be an integer"),
]


@pytest.mark.parametrize(("recipe", "message"), BAD_RECIPES, ids=[b[0] for b in BAD_RECIPES])
def test_bad_max_drop_recipes_are_one_line_usage_errors(shell, recipe, message):
    with pytest.raises(UsageError) as info:
        shell.run_cell_magic("quantize", "model", recipe)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
