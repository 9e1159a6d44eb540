"""``%quantize model --auto --max-drop X``: wb.autotune from the magic; misuse is one line."""

from __future__ import annotations

import pytest
from digits_models import tiny_mlp
from IPython.core.error import UsageError

from workbench.workflows.autotune_result import AutotuneResult
from workbench.workflows.autotune_space import LATENCY_PRESETS

MAX_DROP = 0.5


@pytest.fixture(scope="module")
def model():
    return tiny_mlp()


def test_auto_runs_the_search_and_exports_its_best(shell, tmp_path):
    path = tmp_path / "best.onnx"
    result = shell.run_line_magic(
        "quantize",
        f"model --calib calib --eval accuracy --auto --max-drop {MAX_DROP} --export {path} -o res",
    )
    assert shell.user_ns["res"] is result
    assert isinstance(result, AutotuneResult)
    assert result.max_drop == MAX_DROP and result.budget_met
    assert list(result.table["candidate"][: len(LATENCY_PRESETS)]) == list(LATENCY_PRESETS)
    # the best run's drop, measured again here, is within the budget
    accuracy = shell.user_ns["accuracy"]
    assert accuracy(shell.user_ns["model"]) - accuracy(result.best.model) <= MAX_DROP
    assert path.stat().st_size == int(result.best_row["file_bytes"])


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("--auto", "eval_fn"),
        ("--auto --eval accuracy --bits 4", "chooses the preset"),
        ("--auto --eval accuracy --keep-most-sensitive 1", "keep-most-sensitive"),
        ("--auto --eval accuracy --method qat --train train --loss loss_fn", "--method qat"),
    ],
)
def test_auto_misuse_is_one_line(shell, line, match):
    with pytest.raises(UsageError, match=match):
        shell.run_line_magic("quantize", f"model --calib calib {line}")
