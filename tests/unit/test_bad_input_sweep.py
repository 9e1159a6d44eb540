"""A sweep of bad inputs, faults and odd models over every public function.

Each case builds its own tiny model and data and names what it expects: a ``WorkbenchError``
subclass (or the magic's ``UsageError``) in one line matching a pattern, a documented
warning, or -- for odd models the workbench handles -- success. For every case the user's
model and data are compared before / after (tests/unit/model_guard.py) and no file or
directory is left behind, in the working directory or the temporary directory.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from bad_input_cases import SUCCEEDS, Cases, check_case
from IPython.core.error import UsageError
from model_guard import untouched
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import workbench as wb

CASES = Cases()
case = CASES.case


# models and data -------------------------------------------------------------------------------
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()


def rows(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(5, 4) for _ in range(n)]


def images(n: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(5, 1, 8, 8) for _ in range(n)]


def labelled(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(2)
    return [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(n)]


def ptq(model, data, **kwargs):
    return lambda: wb.ptq(model, data, progress=False, **kwargs)


def ptq_case(model, data, **kwargs):
    return model, data, ptq(model, data, **kwargs)


class _Raises(nn.Module):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.error = error

    def forward(self, x):
        raise self.error


class _DoublesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x.mul_(2)  # in place: the user's calibration tensor must not see it
        return self.fc(x)


class _TrainModeNet(nn.Module):
    """BatchNorm and dropout: in training mode a forward moves the running statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.bn, self.drop, self.fc2 = (
            nn.Linear(4, 8),
            nn.BatchNorm1d(8),
            nn.Dropout(0.5),
            nn.Linear(8, 3),
        )

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def metric_without_eval(data):
    """An eval_fn that does not call .eval(): it must run on an eval-mode copy."""

    def eval_fn(model):
        with torch.no_grad():
            return float(model(data).softmax(-1)[:, 0].mean())

    return eval_fn


# wb.ptq: the model -------------------------------------------------------------------------------
@case(wb.ModelError, "torch.nn.Module")
def case_model_is_a_string(tmp):
    return ptq_case("model", rows())


@case(wb.ModelError, "torch.nn.Module")
def case_model_is_none(tmp):
    return ptq_case(None, rows())


@case(wb.ModelError, "meta device")
def case_meta_device_model(tmp):
    return ptq_case(nn.Sequential(nn.Linear(4, 4)).to("meta"), rows())


@case(wb.ModelError, r"empty weight of shape \[0, 4\]")
def case_zero_size_linear(tmp):
    return ptq_case(nn.Sequential(nn.Linear(4, 0)).eval(), rows())


@case(wb.ModelError, "no layer to quantize")
def case_no_supported_layer(tmp):
    return ptq_case(nn.Sequential(nn.LayerNorm(4)).eval(), rows())


@case(wb.NonFiniteError, r"'2\.weight'")
def case_nan_weight(tmp):
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    return ptq_case(model, rows())


@case(wb.NonFiniteError, r"'2\.weight'")
def case_weight_beyond_float32(tmp):
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(1e39)  # inf in float32
    return ptq_case(model, rows())


@case(wb.NonFiniteError, r"'1\.running_var'")
def case_inf_batchnorm_statistic(tmp):
    model = cnn()
    model[1].running_var[0] = float("inf")
    return ptq_case(model, images())


@case(wb.CalibrationError, r"\(KeyError: 'token'\)")
def case_forward_raises_key_error(tmp):
    return ptq_case(_Raises(KeyError("token")).eval(), rows())


@case(wb.CalibrationError, r"\(AssertionError: shapes\)")
def case_forward_raises_assertion_error(tmp):
    return ptq_case(_Raises(AssertionError("shapes")).eval(), rows())


@case(UserWarning, "training mode")
def case_model_in_training_mode(tmp):
    model = _TrainModeNet().train()
    data = rows()
    return ptq_case(model, data, eval_fn=metric_without_eval(data[0]))


@case(SUCCEEDS)
def case_model_changes_its_input_in_place(tmp):
    return ptq_case(_DoublesItsInput().eval(), rows())


@case(SUCCEEDS)
def case_weight_norm_layer(tmp):
    torch.manual_seed(0)
    return ptq_case(nn.Sequential(weight_norm(nn.Linear(4, 3))).eval(), rows())


@case(SUCCEEDS)
def case_huge_finite_weights(tmp):
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(1e37)
    data = rows()

    def call():
        summary = wb.ptq(model, data, progress=False).report.summary
        assert torch.isfinite(torch.tensor(summary["model_output_cosine"]))

    return model, data, call


# wb.ptq: the data --------------------------------------------------------------------------------
@case(wb.CalibrationError, "is None")
def case_calib_none(tmp):
    return ptq_case(mlp(), None)


@case(wb.CalibrationError, "not iterable")
def case_calib_int(tmp):
    return ptq_case(mlp(), 5)


@case(wb.CalibrationError, "yielded 0 batches")
def case_calib_empty_list(tmp):
    return ptq_case(mlp(), [])


@case(wb.CalibrationError, "0 samples")
def case_calib_zero_samples(tmp):
    return ptq_case(mlp(), torch.zeros(0, 4))


@case(wb.CalibrationError, "batch 1 of calib_data could not run")
def case_calib_wrong_shape(tmp):
    return ptq_case(mlp(), [torch.randn(5, 4), torch.randn(5, 6)])


@case(wb.CalibrationError, "batch 0 of calib_data could not run")
def case_calib_wrong_dtype(tmp):
    return ptq_case(mlp(), [torch.ones(5, 4, dtype=torch.long)])


@case(wb.NonFiniteError, "input of 0")
def case_calib_nan(tmp):
    data = rows()
    data[0][1, 1] = float("nan")
    return ptq_case(mlp(), data)


@case(RuntimeWarning, r"input of 0 was constant .*every value 0")
def case_calib_all_zero(tmp):
    return ptq_case(mlp(), [torch.zeros(5, 4)])


@case(RuntimeWarning, r"input of 0 was constant .*every value 3")
def case_calib_constant(tmp):
    return ptq_case(mlp(), [torch.full((5, 4), 3.0)])


@case(wb.CalibrationError, "num_batches must be an int")
def case_num_batches_string(tmp):
    return ptq_case(mlp(), rows(), num_batches="2")


@case(wb.CalibrationError, "num_batches must be an int")
def case_num_batches_bool(tmp):
    return ptq_case(mlp(), rows(), num_batches=True)


@case(wb.CalibrationError, "num_batches must be >= 1")
def case_num_batches_zero(tmp):
    return ptq_case(mlp(), rows(), num_batches=0)


# wb.ptq: eval_fn ----------------------------------------------------------------------------------
@case(wb.ConfigError, "eval_fn must be a function")
def case_eval_fn_not_callable(tmp):
    return ptq_case(mlp(), rows(), eval_fn=0.9)


@case(wb.MetricError, "returned str 'high' for the FP32 model")
def case_eval_fn_returns_string(tmp):
    return ptq_case(mlp(), rows(), eval_fn=lambda m: "high")


@case(wb.MetricError, "returned NoneType None")
def case_eval_fn_returns_none(tmp):
    return ptq_case(mlp(), rows(), eval_fn=lambda m: None)


@case(wb.MetricError, "returned Tensor")
def case_eval_fn_returns_tensor(tmp):
    return ptq_case(mlp(), rows(), eval_fn=lambda m: torch.ones(3))


@case(wb.MetricError, "returned nan for the FP32 model")
def case_eval_fn_returns_nan(tmp):
    return ptq_case(mlp(), rows(), eval_fn=lambda m: float("nan"))


@case(wb.MetricError, "returned inf")
def case_eval_fn_returns_inf(tmp):
    return ptq_case(mlp(), rows(), eval_fn=lambda m: float("inf"))


@case(wb.MetricError, "returned nan for the quantized model")
def case_eval_fn_nan_for_the_quantized_model(tmp):
    from workbench.engine.quantizers.modules import WeightQuantizer

    def eval_fn(m):
        quantized = any(isinstance(x, WeightQuantizer) for x in m.modules())
        return float("nan") if quantized else 1.0

    return ptq_case(mlp(), rows(), eval_fn=eval_fn)


# configs and schemes ---------------------------------------------------------------------------
def config_case(**fields):
    return None, None, lambda: wb.QuantConfig(**fields)


def scheme_case(**fields):
    return None, None, lambda: wb.Scheme(**fields)


@case(wb.ConfigError, "symmetric must be True or False, got str 'False'")
def case_scheme_symmetric_string(tmp):
    return scheme_case(symmetric="False")


@case(wb.ConfigError, "per_channel must be True or False, got str 'no'")
def case_scheme_per_channel_string(tmp):
    return scheme_case(per_channel="no")


@case(wb.ConfigError, "narrow_range must be True or False")
def case_scheme_narrow_range_int(tmp):
    return scheme_case(narrow_range=1)


@case(wb.ConfigError, "bits must be in 2..8")
def case_scheme_bits_9(tmp):
    return scheme_case(bits=9)


@case(wb.ConfigError, "bits must be an int")
def case_scheme_bits_string(tmp):
    return scheme_case(bits="8")


@case(wb.ConfigError, "percentile must be a number")
def case_config_percentile_string(tmp):
    return config_case(percentile="99")


@case(wb.ConfigError, r"percentile must be in \(50, 100\]")
def case_config_percentile_20(tmp):
    return config_case(percentile=20.0)


@case(wb.ConfigError, "exclude must be a tuple of layer names, got None")
def case_config_exclude_none(tmp):
    return config_case(exclude=None)


@case(wb.ConfigError, "exclude holds 3")
def case_config_exclude_int_item(tmp):
    return config_case(exclude=("fc", 3))


@case(wb.ConfigError, "unknown observer 'kl'")
def case_config_unknown_observer(tmp):
    return config_case(observer="kl")


@case(wb.ConfigError, "quantize_embeddings must be True or False")
def case_config_quantize_embeddings_string(tmp):
    return config_case(quantize_embeddings="yes")


@case(wb.ConfigError, "per-channel weights use axis=0")
def case_config_per_channel_axis_1(tmp):
    return config_case(weight=wb.Scheme(8, True, True, axis=1))


@case(wb.ConfigError, "unknown preset 'int9'")
def case_config_unknown_preset(tmp):
    return ptq_case(mlp(), rows(), config="int9")


@case(wb.ConfigError, "must be a QuantConfig")
def case_config_of_the_wrong_type(tmp):
    return ptq_case(mlp(), rows(), config=5)


@case(wb.ConfigError, r"pattern 'fc9' matches no layer .*this model's: 0, 2")
def case_exclude_matches_nothing(tmp):
    return ptq_case(mlp(), rows(), config=wb.QuantConfig(exclude=("fc9",)))


# wb.qat -------------------------------------------------------------------------------------------
def qat_case(model=None, data=None, **kwargs):
    model = mlp() if model is None else model
    data = labelled() if data is None else data
    kwargs.setdefault("loss_fn", nn.CrossEntropyLoss())
    return model, data, lambda: wb.qat(model, data, progress=False, **kwargs)


@case(wb.ConfigError, "qat needs loss_fn")
def case_qat_without_loss(tmp):
    return qat_case(loss_fn=None)


@case(wb.ConfigError, "epochs must be an int >= 1")
def case_qat_epochs_zero(tmp):
    return qat_case(epochs=0)


@case(wb.ConfigError, "lr must be a number > 0")
def case_qat_lr_string(tmp):
    return qat_case(lr="1e-3")


@case(wb.ConfigError, "eval_fn must be a function")
def case_qat_eval_fn_not_callable(tmp):
    return qat_case(eval_fn="accuracy")


@case(wb.MetricError, "after epoch 1")
def case_qat_eval_fn_returns_nan(tmp):
    return qat_case(eval_fn=lambda m: float("nan"))


@case(wb.ConfigError, r"loss_fn returned \[5\] at step 2")
def case_qat_loss_non_scalar_after_the_first_batch(tmp):
    calls = []

    def loss_fn(output, target):
        calls.append(1)
        losses = nn.functional.cross_entropy(output, target, reduction="none")
        return losses.mean() if len(calls) <= 2 else losses  # the check, then step 1

    return qat_case(loss_fn=loss_fn)


@case(UserWarning, "training mode")
def case_qat_model_in_training_mode(tmp):
    data = labelled()
    return qat_case(_TrainModeNet().train(), data, eval_fn=metric_without_eval(data[0][0]))


@case(wb.CalibrationError, "single tensor")
def case_qat_train_data_tensor(tmp):
    return qat_case(data=torch.randn(5, 4))


# wb.sensitivity, wb.auto_mixed_precision, wb.keep_most_sensitive_fp32 ---------------------------
@case(wb.ConfigError, "eval_fn must be a function")
def case_sensitivity_eval_fn_not_callable(tmp):
    model, data = mlp(), rows()
    return model, data, lambda: wb.sensitivity(model, data, eval_fn="acc", progress=False)


@case(wb.MetricError, "returned nan for the FP32 model")
def case_sensitivity_eval_fn_returns_nan(tmp):
    model, data = mlp(), rows()
    return model, data, lambda: wb.sensitivity(model, data, lambda m: math_nan(), progress=False)


def math_nan() -> float:
    return float("nan")


def search_case(**kwargs):
    model, data = mlp(), rows()
    kwargs.setdefault("eval_fn", lambda m: 1.0)
    return model, data, lambda: wb.auto_mixed_precision(model, data, progress=False, **kwargs)


@case(wb.ConfigError, "max_drop must be a finite number >= 0.*got nan")
def case_max_drop_nan(tmp):
    return search_case(max_drop=float("nan"))


@case(wb.ConfigError, "max_drop must be a number >= 0.*got str '0.5'")
def case_max_drop_string(tmp):
    return search_case(max_drop="0.5")


@case(wb.ConfigError, "max_drop must be a finite number >= 0.*got -1")
def case_max_drop_negative(tmp):
    return search_case(max_drop=-1)


@case(wb.ConfigError, "needs eval_fn")
def case_max_drop_without_eval_fn(tmp):
    return search_case(eval_fn=None)


@case(wb.MetricError, "returned nan for the FP32 model")
def case_search_eval_fn_returns_nan(tmp):
    return search_case(eval_fn=lambda m: float("nan"))


@case(wb.ConfigError, "count must be an int")
def case_keep_most_sensitive_count_string(tmp):
    model, data = mlp(), rows()
    return model, data, lambda: wb.keep_most_sensitive_fp32(model, data, "1", progress=False)


@case(wb.ConfigError, "count must be between 0 and 1")
def case_keep_most_sensitive_count_too_large(tmp):
    model, data = mlp(), rows()
    return model, data, lambda: wb.keep_most_sensitive_fp32(model, data, 5, progress=False)


# ONNX files: parity, fusion, benchmark ----------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A quantized CNN and its INT8 / FP32 files (made once, outside the swept directories)."""
    folder = tmp_path_factory.mktemp("exported")
    result = wb.ptq(cnn(), images(), progress=False)
    int8 = result.export_onnx(folder / "int8.onnx", images()[0], check_fusion=False)
    fp32 = result.export_fp32_onnx(folder / "fp32.onnx", images()[0])
    return result, int8, fp32


EXPORTED: dict[str, Any] = {}


def garbage(tmp: Path) -> Path:
    path = tmp / "garbage.onnx"
    path.write_bytes(b"\x08\x07 not a model")
    return path


@case(wb.ConfigError, "ONNX Runtime cannot load")
def case_parity_garbage_file(tmp):
    result = EXPORTED["result"]
    path = garbage(tmp)
    return result.model, images(), lambda: result.parity(path, images())


@case(wb.ConfigError, "no ONNX file at")
def case_parity_missing_file(tmp):
    result = EXPORTED["result"]
    return result.model, None, lambda: result.parity(tmp / "missing.onnx", images())


@case(wb.CalibrationError, r"shape \[5, 2, 8, 8\].*takes shape \['N', 1, 8, 8\]")
def case_parity_wrong_shape(tmp):
    result, data = EXPORTED["result"], [torch.randn(5, 2, 8, 8)]
    return result.model, data, lambda: result.parity(EXPORTED["int8"], data)


@case(wb.CalibrationError, "dtype float64")
def case_parity_float64(tmp):
    result, data = EXPORTED["result"], [torch.randn(5, 1, 8, 8, dtype=torch.float64)]
    return result.model, data, lambda: result.parity(EXPORTED["int8"], data)


@case(wb.ConfigError, "not an ONNX model|ONNX Runtime cannot load")
def case_fusion_garbage_file(tmp):
    result = EXPORTED["result"]
    path = garbage(tmp)
    return result.model, None, lambda: result.fusion(path)


@case(wb.CalibrationError, "dtype float64")
def case_benchmark_float64(tmp):
    data = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    call = lambda: wb.benchmark(EXPORTED["fp32"], EXPORTED["int8"], data, runs=1, warmup=0)  # noqa: E731
    return None, data, call


@case(wb.ConfigError, "ONNX Runtime cannot load")
def case_benchmark_garbage_file(tmp):
    path, data = garbage(tmp), images()[0]
    return None, data, lambda: wb.benchmark(path, EXPORTED["int8"], data, runs=1, warmup=0)


@case(wb.CalibrationError, r"input 0 is \[N, 2, 8, 8\] float32, the model was calibrated on")
def case_export_wrong_shape_into_new_folders(tmp):
    result, example = EXPORTED["result"], torch.randn(5, 2, 8, 8)
    return result.model, example, lambda: result.export_onnx(tmp / "a" / "b" / "c.onnx", example)


@case(
    wb.CalibrationError, r"\[N, 1, 8, 8\] int64, the model was calibrated on \[N, 1, 8, 8\] float32"
)
def case_export_long_input(tmp):
    result, example = EXPORTED["result"], torch.ones(5, 1, 8, 8, dtype=torch.long)
    return result.model, example, lambda: result.export_onnx(tmp / "int8.onnx", example)


@case(wb.CalibrationError, "float64, the model was calibrated on")
def case_export_fp32_float64_input(tmp):
    result, example = EXPORTED["result"], torch.randn(5, 1, 8, 8, dtype=torch.float64)
    return result.fp32_model, example, lambda: result.export_fp32_onnx(tmp / "f.onnx", example)


class _Inverts(nn.Module):
    """A Linear, then an op the ONNX exporter does not know (aten::linalg_inv)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.linalg.inv(self.fc(x).reshape(-1, 2, 2)).reshape(-1, 4)


def unexportable():
    model, data = _Inverts().eval(), rows()
    return wb.ptq(model, data, progress=False), data[0]


@case(wb.ExportError, "aten::linalg_inv")
def case_export_unsupported_op_into_new_folders(tmp):
    result, example = unexportable()
    return result.model, example, lambda: result.export_onnx(tmp / "a" / "b" / "c.onnx", example)


@case(wb.ConfigError, "opset 10 is below 13, the minimum")
def case_export_opset_10(tmp):
    result, example = EXPORTED["result"], images()[0]
    return (
        result.model,
        example,
        lambda: result.export_onnx(tmp / "a" / "m.onnx", example, opset=10),
    )


@case(wb.ConfigError, "opset must be an int")
def case_export_opset_string(tmp):
    result, example = EXPORTED["result"], images()[0]
    return result.model, example, lambda: result.export_onnx(tmp / "m.onnx", example, opset="17")


@case(wb.ExportError, r"cannot write the ONNX file '.*m\.onnx': No space left on device")
def case_export_full_disk(tmp):
    result, example = EXPORTED["result"], images()[0]

    def call():
        full = OSError(errno.ENOSPC, "No space left on device")
        with mock.patch("onnx.save", side_effect=full):
            result.export_onnx(tmp / "new" / "m.onnx", example, check_fusion=False)

    return result.model, example, call


@case(wb.ExportError, r"cannot write the ONNX file '.*m\.onnx': Permission denied")
def case_export_read_only_folder(tmp):
    result, example = EXPORTED["result"], images()[0]

    def call():
        denied = PermissionError(errno.EACCES, "Permission denied")
        with mock.patch("workbench.atomic_file.tempfile.mkstemp", side_effect=denied):
            result.export_fp32_onnx(tmp / "m.onnx", example)

    return result.fp32_model, example, call


@case(wb.ExportError, "is a directory")
def case_export_to_a_directory(tmp):
    result, example = EXPORTED["result"], images()[0]
    (tmp / "folder.onnx").mkdir()
    return result.model, example, lambda: result.export_onnx(tmp / "folder.onnx", example)


@case(SUCCEEDS)
def case_benchmark_of_a_training_mode_module(tmp):
    model, example = cnn().train(), images()[0]
    return model, example, lambda: wb.benchmark(model, EXPORTED["int8"], example, runs=1, warmup=0)


# the magic ----------------------------------------------------------------------------------------
def magic_case(line: str, cell: str | None = None, **names):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.reset(new_session=False)
    shell.run_line_magic("load_ext", "workbench")
    model, calib = mlp(), rows()
    shell.user_ns.update(model=model, calib=calib, **names)
    if cell is None:
        call = lambda: shell.run_line_magic("quantize", line)  # noqa: E731
    else:
        call = lambda: shell.run_cell_magic("quantize", line, cell)  # noqa: E731
    return model, calib, call


@case(UsageError, "not '{calib}'")
def case_magic_expression_is_not_expanded(tmp):
    return magic_case("model --calib {calib}")


@case(UsageError, "not '\\$calib'")
def case_magic_dollar_name_is_not_expanded(tmp):
    return magic_case("model --calib $calib")


@case(UsageError, "-o model would replace the model")
def case_magic_output_replaces_the_model(tmp):
    return magic_case("model --calib calib -o model")


@case(UsageError, "would replace the variable 'x'.*--force")
def case_magic_output_replaces_a_variable(tmp):
    return magic_case("model --calib calib -o x", x=3)


@case(UsageError, "sets 'bits' twice")
def case_magic_recipe_duplicate_key(tmp):
    return magic_case("model", "calib: calib\nbits: 4\nbits: 8")


@case(UsageError, r"input 0 is \[N, 4\] float64, the model was calibrated on \[N, 4\] float32")
def case_magic_bench_float64_example(tmp):
    return magic_case(
        "model --calib calib --bench --example x64", x64=torch.randn(5, 4, dtype=torch.float64)
    )


@case(UsageError, "max_drop must be a number|--max-drop")
def case_magic_max_drop_nan(tmp):
    return magic_case("model --calib calib --eval f --max-drop nan", f=lambda m: 1.0)


@case(UsageError, "returned nan")
def case_magic_eval_returns_nan(tmp):
    return magic_case("model --calib calib --eval f", f=lambda m: float("nan"))


# the panel ----------------------------------------------------------------------------------------
@case(wb.ModelError, "needs a torch.nn.Module")
def case_panel_not_a_module(tmp):
    return None, rows(), lambda: wb.panel("model", rows())


def panel_case(model, data, **kwargs):
    def call():
        app = wb.panel(model, data, **kwargs)
        app.run_button.click()
        if app.last_exception is not None:  # the panel shows it in one line; raise it here
            raise app.last_exception
        assert app.result is not None

    return model, data, call


@case(wb.MetricError, "returned nan for the FP32 model")
def case_panel_eval_fn_returns_nan(tmp):
    return panel_case(mlp(), rows(), eval_fn=lambda m: float("nan"))


@case(SUCCEEDS)
def case_panel_model_in_training_mode(tmp):
    data = rows()
    return panel_case(_TrainModeNet().train(), data, eval_fn=metric_without_eval(data[0]))


# the sweep ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, monkeypatch, exported):
    EXPORTED.update(result=exported[0], int8=exported[1], fp32=exported[2])
    check_case(CASES[name], tmp_path, monkeypatch, errors=(wb.WorkbenchError, UsageError))


def test_the_sweep_covers_at_least_60_inputs():
    assert len(CASES) >= 60


def test_training_mode_model_is_measured_in_eval_mode():
    """The FP32 metric is the eval-mode one (dropout off), whatever eval_fn does."""
    model, data = _TrainModeNet().train(), rows()
    eval_fn = metric_without_eval(data[0])
    with untouched(model, data), pytest.warns(UserWarning, match="training mode"):
        result = wb.ptq(model, data, eval_fn=eval_fn, progress=False)
    reference = _TrainModeNet()
    reference.load_state_dict(model.state_dict())
    assert result.report.summary["metric_fp32"] == eval_fn(reference.eval())


def test_tied_weights_count_once_in_the_fp32_size():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.hidden = nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.embed.weight  # tied, as in language models

        def forward(self, ids):
            return self.head(torch.relu(self.hidden(self.embed(ids))))

    model = Tied().eval()
    storage = wb.ptq(model, torch.randint(0, 10, (4, 5)), progress=False).report.storage
    total = storage.set_index("layer").loc["TOTAL", "fp32_bytes"]
    assert total == 4 * sum(p.numel() for p in model.parameters())  # parameters() dedupes


def test_a_failed_export_prints_nothing(capfd):
    """The exporter's TorchScript IR dump is kept on the error, not printed."""
    result, example = unexportable()
    capfd.readouterr()
    with pytest.raises(wb.ExportError) as info:
        result.export_onnx("never.onnx", example)
    printed = capfd.readouterr()
    assert "Torch IR graph" not in printed.out + printed.err
    assert "Torch IR graph" in info.value.exporter_log


def test_the_model_changing_its_input_sees_a_copy():
    model, batch = _DoublesItsInput().eval(), torch.randn(5, 4)
    original = batch.clone()
    wb.ptq(model, [batch], progress=False)
    assert torch.equal(batch, original)
