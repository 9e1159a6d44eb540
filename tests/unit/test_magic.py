"""%quantize / %%quantize driven through a real IPython InteractiveShell.

The reference for every run is the public function called directly (``wb.ptq`` / ``wb.qat``
with the config the options describe, written out by hand here): the magic must give the
same model and report, and every user mistake must be a one-line UsageError.
"""

from __future__ import annotations

import pytest
import torch
from digits_models import tiny_mlp
from IPython.core.error import UsageError

import workbench as wb
from workbench.demo import accuracy


class CountingBatches:
    """An iterable of batches that counts how many were drawn."""

    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            yield batch


@pytest.fixture(scope="module")
def model():
    return tiny_mlp()


def quantize(shell, line: str):
    return shell.run_line_magic("quantize", line)


def same_model_outputs(a, b, x) -> bool:
    with torch.no_grad():
        return torch.equal(a.model(x), b.model(x))


def test_load_ext_registers_line_and_cell_magic(shell):
    magics = shell.magics_manager.magics
    assert "quantize" in magics["line"]
    assert "quantize" in magics["cell"]


def test_ptq_line_matches_ptq_called_directly(shell, model, digits):
    result = quantize(
        shell, "model --calib calib --bits 4 --asymmetric --per-tensor --observer percentile -o res"
    )
    expected_config = wb.QuantConfig(
        weight=wb.Scheme(4, symmetric=False, per_channel=False),
        activation=wb.Scheme(8, symmetric=False, per_channel=False),
        observer="percentile",
    )
    assert result.config == expected_config
    assert shell.user_ns["res"] is result
    direct = wb.ptq(model, digits.calib_batches(4, 32), config=expected_config, progress=False)
    assert same_model_outputs(result, direct, digits.test_x)
    assert result.report.summary["quantized_bytes"] == direct.report.summary["quantized_bytes"]


def test_default_is_int8_preset_and_result_displays_as_report(shell):
    result = quantize(shell, "model --calib calib")
    assert result.method == "ptq"
    assert result.config == wb.QuantConfig.preset("int8")
    data, _ = shell.display_formatter.format(result)
    assert "application/vnd.workbench.report+json" in data
    assert data["text/plain"] == result.report.summary_text()


def test_eval_exclude_and_num_batches(shell, model, digits):
    shell.user_ns["counted"] = CountingBatches(digits.calib_batches(6, 32))
    result = quantize(shell, "model --calib counted --num-batches 2 --exclude fc2 --eval accuracy")
    assert shell.user_ns["counted"].drawn == 2
    layers = result.report.layers.set_index("layer")
    assert layers.loc["fc2", "status"] == "fp32"
    assert layers.loc["fc2", "reason"] == "excluded by config"
    assert layers.loc["fc1", "status"] == "quantized"
    reference = accuracy(model, digits.test_x, digits.test_y)
    assert result.report.summary["metric_fp32"] == pytest.approx(reference)


def test_dotted_names_are_looked_up(shell, digits):
    result = quantize(shell, "model --calib data.test_x --num-batches 1")
    direct = wb.ptq(shell.user_ns["model"], digits.test_x, progress=False)
    assert same_model_outputs(result, direct, digits.test_x[:16])


def test_cell_recipe_equals_line(shell, digits):
    recipe = """
    calib: calib
    preset: int8-per-tensor
    bits: 6
    asymmetric: true
    observer: mse
    exclude: [fc1]
    output: from_recipe
    """
    from_cell = shell.run_cell_magic("quantize", "model", recipe)
    from_line = quantize(
        shell, "model --calib calib --preset int8-per-tensor --bits 6 --asymmetric "
        "--observer mse --exclude fc1",
    )  # fmt: skip
    assert from_cell.config == from_line.config
    assert from_cell.config.weight == wb.Scheme(6, symmetric=False, per_channel=False)
    assert from_cell.config.exclude == ("fc1",)
    assert shell.user_ns["from_recipe"] is from_cell
    assert same_model_outputs(from_cell, from_line, digits.test_x)


def test_cell_recipe_may_name_the_model_and_use_dashed_keys(shell):
    result = shell.run_cell_magic("quantize", "", "model: model\ncalib: calib\nper-tensor: true")
    assert result.config.weight.per_channel is False


def test_qat_line(shell, digits):
    result = quantize(shell, "model --method qat --train train --loss loss_fn --epochs 2 --lr 1e-3")
    assert result.method == "qat"
    assert len(result.history) == 2 * len(shell.user_ns["train"])
    assert result.report.summary["qat_epochs_completed"] == 2
    with torch.no_grad():
        assert not torch.equal(result.model(digits.test_x), result.fp32_model(digits.test_x))


def test_qat_cell_recipe(shell):
    recipe = "method: qat\ntrain: train\nloss: loss_fn\nepochs: 1\nlr: 1e-3\n"
    result = shell.run_cell_magic("quantize", "model --bits 4", recipe)
    assert result.method == "qat"
    assert result.config.weight.bits == 4
    assert len(result.history) == len(shell.user_ns["train"])


def test_help_lists_every_option_and_examples(shell):
    info = shell.object_inspect("%quantize")
    assert info["found"]
    doc = info["docstring"]
    for flag in ["--calib", "--method", "--preset", "--bits", "--per-tensor", "--per-channel",
                 "--symmetric", "--asymmetric", "--observer", "--exclude", "--train", "--loss",
                 "--epochs", "--lr", "--eval", "--export", "--example", "--bench", "-o",
                 "--panel", "%%quantize", "examples:"]:  # fmt: skip
        assert flag in doc, flag


BAD_LINES = [
    ("missing --calib calib", "no variable named 'missing'"),
    ("not_a_model --calib calib", "'not_a_model' is a list, not a torch.nn.Module"),
    ("--calib calib", "name the model to quantize"),
    ("model", "PTQ needs calibration data: add --calib"),
    ("model --calib nowhere", "--calib: no variable named 'nowhere'"),
    ("model --calib data.nothing", "'data' has no attribute 'nothing'"),
    ("model --calib calib[0]", "takes the name of a notebook variable"),
    ("model --method qat", "QAT needs training data and a loss: add --train, --loss"),
    ("model --method qat --train train", "QAT needs training data and a loss: add --loss"),
    ("model --method qat --train train --loss number", "'number' is a int, not a function"),
    ("model --calib calib --epochs 2", "--epochs apply to QAT; add --method qat"),
    ("model --method qat --train train --loss loss_fn --num-batches 2", "applies to PTQ"),
    ("model --calib calib --bits 9", "--bits must be in 2..8, got 9"),
    ("model --calib calib --bits four", "argument --bits: invalid int value: 'four'"),
    ("model --calib calib --method int4", "argument --method: invalid choice: 'int4'"),
    ("model --calib calib --preset int3", "argument --preset: invalid choice: 'int3'"),
    ("model --calib calib --observer max", "argument --observer: invalid choice: 'max'"),
    ("model --calib calib --per-tensor --per-channel", "not allowed with argument"),
    ("model --calib calib --frobnicate", "unrecognized arguments: --frobnicate"),
    ("model --calib calib --num-batches 0", "argument --num-batches: must be >= 1"),
    ("model --calib calib -o 2x", "-o takes a variable name"),
    ("model --calib calib --example x", "--example is the input of --export / --bench"),
    ("model --calib 'calib", "check the quotes"),
    ("model --calib calib --eval number", "--eval 'number' is a int, not a function"),
    ("model --calib number", "calib_data of type int is not iterable"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_user_mistakes_are_one_line_usage_errors(shell, line, message):
    with pytest.raises(UsageError) as info:
        quantize(shell, line)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_workbench_errors_become_usage_errors(shell):
    shell.user_ns["wrong_shape"] = [torch.randn(4, 3)]
    with pytest.raises(UsageError) as info:
        quantize(shell, "model --calib wrong_shape")
    assert "batch 0 of calib_data could not run through the model" in str(info.value)
    assert "\n" not in str(info.value)


BAD_RECIPES = [
    ("calib: [calib", "the recipe is not valid YAML"),
    ("- calib\n- train", "the recipe must be a mapping"),
    ("calib: calib\ncalbi: calib", "unknown recipe key 'calbi'"),
    ("calib: calib\nbits: four", "recipe key 'bits' must be an integer"),
    ("calib: calib\nbench: maybe", "recipe key 'bench' must be true or false"),
    ("calib: calib\nlr: fast\nmethod: qat\ntrain: train\nloss: loss_fn", "'lr' must be a number"),
    ("calib: calib\nexclude: {fc1: 1}", "recipe key 'exclude' must be a name or a list"),
    ("method: qat\ntrain: train", "QAT needs training data and a loss: add --loss"),
    ("preset: int8", "PTQ needs calibration data"),
    ("calib: calib\npreset: int3", "unknown preset 'int3'"),
    ("calib: calib\nobserver: max", "unknown observer 'max'"),
]


@pytest.mark.parametrize(("recipe", "message"), BAD_RECIPES, ids=[b[1] for b in BAD_RECIPES])
def test_bad_recipes_are_one_line_usage_errors(shell, recipe, message):
    with pytest.raises(UsageError) as info:
        shell.run_cell_magic("quantize", "model", recipe)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_key_on_line_and_in_recipe_is_a_usage_error(shell):
    with pytest.raises(UsageError, match="calib set both on the line and in the recipe"):
        shell.run_cell_magic("quantize", "model --calib calib", "calib: calib")


def test_empty_recipe_runs_the_line(shell):
    result = shell.run_cell_magic("quantize", "model --calib calib --bits 5", "\n# nothing\n")
    assert result.config.weight.bits == 5


def test_panel_option_returns_panel_with_controls_set(shell):
    from workbench.notebook.panel import WorkbenchPanel

    app = quantize(
        shell, "model --calib calib --panel --bits 4 --per-tensor --exclude 'fc*' --eval accuracy"
    )
    assert isinstance(app, WorkbenchPanel)
    assert app.bits.value == 4
    assert app.per_channel.value is False
    assert app.keep_fp32.value == ("fc1", "fc2")
    assert app.config().exclude == ("fc1", "fc2")
    assert app.result is None


def test_panel_option_refuses_export(shell):
    with pytest.raises(UsageError, match="--export are buttons of the panel"):
        quantize(shell, "model --calib calib --panel --export m.onnx")


def ort_outputs(path, x: torch.Tensor):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_export_writes_onnx_that_runs_like_the_result(shell, tmp_path, digits, digits_model):
    # the demo CNN trained to 98-99%: top-1 agreement means something on a model whose
    # logits are not near ties (tiny_mlp has seen 40 steps)
    shell.user_ns["trained"] = digits_model
    path = tmp_path / "out" / "model_int8.onnx"
    result = quantize(shell, f"trained --calib calib --export {path}")
    assert path.is_file()
    assert result.extras["onnx_path"] == path
    x = digits.test_x  # the whole test set: 0.995 allows one image of 360 to differ
    with torch.no_grad():
        simulated = result.model(x).numpy()
    from_ort = ort_outputs(path, x)
    agreement = (from_ort.argmax(1) == simulated.argmax(1)).mean()
    assert agreement >= 0.995  # as tests/integration/test_export_digits.py asks of ptq()
    assert "benchmark" not in result.extras


def test_bench_times_fp32_against_the_exported_file(shell, tmp_path):
    path = tmp_path / "model_int8.onnx"
    result = quantize(shell, f"model --calib calib --export {path} --example x --bench")
    bench = result.extras["benchmark"]
    table = bench.table.set_index("model")
    assert set(table.index) == {"fp32", "int8"}
    assert table.loc["int8", "file_bytes"] == path.stat().st_size
    # FP32 and INT8 both timed: the speedup is their p50 ratio and INT8 is the smaller file
    p50 = table["latency_p50_ms"]
    assert bench.speedup == pytest.approx(p50["fp32"] / p50["int8"])
    assert (table["latency_p90_ms"] >= p50).all()
    assert table.loc["int8", "file_bytes"] < table.loc["fp32", "file_bytes"]
    assert bench.batch_size == len(shell.user_ns["x"])
    titles = set(result.report.extra_tables)
    assert any(table.equals(bench.table) for table in result.report.extra_tables.values()), titles


def test_bench_without_export_uses_a_temporary_file(shell):
    result = quantize(shell, "model --calib calib --bench")
    assert "onnx_path" not in result.extras
    bench = result.extras["benchmark"]
    table = bench.table.set_index("model")
    p50 = table["latency_p50_ms"]
    assert bench.speedup == pytest.approx(p50["fp32"] / p50["int8"])
    assert table.loc["int8", "file_bytes"] < table.loc["fp32", "file_bytes"]
