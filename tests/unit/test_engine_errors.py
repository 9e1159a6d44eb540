"""Bad input gets one clear error (naming the fix) and leaves the input model as it was."""

from __future__ import annotations

import pytest
import torch
from model_guard import untouched
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import workbench as wb
from workbench.engine.placement.layers import QuantizedLayer


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def images(n: int = 2) -> list[torch.Tensor]:
    return [torch.randn(5, 1, 8, 8) for _ in range(n)]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def expect_clean_failure(model, calib_data, error, match, **kwargs):
    """ptq raises ``error`` (matching ``match``) in one line; ``model`` and ``calib_data`` are
    as before (tests/unit/model_guard.py), the model still free of quantizers."""
    with untouched(model, calib_data), pytest.raises(error, match=match) as info:
        wb.ptq(model, calib_data, progress=False, **kwargs)
    assert isinstance(info.value, wb.WorkbenchError)
    assert len(str(info.value).splitlines()) == 1
    if isinstance(model, nn.Module):
        for module in model.modules():
            assert not isinstance(module, QuantizedLayer)
    return info.value


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.LayerNorm(4), nn.ReLU()),
        nn.Sequential(nn.ReLU()),
        nn.Sequential(nn.Embedding(10, 4)),
    ],
    ids=["layernorm", "no-parameters", "embedding"],
)
def test_model_without_supported_layer(model):
    data = torch.randint(0, 10, (3, 4)) if isinstance(model[0], nn.Embedding) else torch.randn(3, 4)
    error = expect_clean_failure(model, data, wb.ModelError, "no layer to quantize")
    assert "Linear, Conv1d, Conv2d" in str(error)


def test_every_layer_excluded_is_a_model_error():
    config = wb.QuantConfig.preset("int8", exclude=("*",))
    expect_clean_failure(mlp(), torch.randn(3, 4), wb.ModelError, "config.exclude", config=config)


@pytest.mark.parametrize(
    "data",
    [
        [],
        (),
        iter([]),
        DataLoader(TensorDataset(torch.zeros(0, 4)), batch_size=2),
    ],
    ids=["list", "tuple", "iterator", "dataloader"],
)
def test_empty_calib_data(data):
    expect_clean_failure(mlp(), data, wb.CalibrationError, "yielded 0 batches")


class _SkipsItsLinear(nn.Module):
    """Holds a Linear that its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_no_layer_reached_by_the_calibration_data():
    expect_clean_failure(
        _SkipsItsLinear(), torch.randn(3, 4), wb.CalibrationError, "no quantizable layer ran"
    )


def test_no_layer_reached_is_the_same_error_in_qat_and_sensitivity():
    data = [(torch.randn(3, 4), torch.randn(3, 4))]
    with pytest.raises(wb.CalibrationError, match="no quantizable layer ran"):
        wb.qat(_SkipsItsLinear(), data, loss_fn=nn.MSELoss(), progress=False)
    with pytest.raises(wb.CalibrationError, match="no quantizable layer ran"):
        wb.sensitivity(_SkipsItsLinear(), torch.randn(3, 4), progress=False)


def test_batch_with_zero_samples():
    expect_clean_failure(mlp(), torch.zeros(0, 4), wb.CalibrationError, "0 samples")


@pytest.mark.parametrize("bad_index", [0, 1])
def test_wrong_shape_batch(bad_index):
    batches = [torch.randn(3, 4), torch.randn(3, 4)]
    batches[bad_index] = torch.randn(3, 5)
    error = expect_clean_failure(mlp(), batches, wb.CalibrationError, f"batch {bad_index}")
    assert "shaped like the model's input" in str(error)


def test_wrong_shape_batch_cnn_with_batchnorm():
    model = small_cnn().train()
    expect_clean_failure(model, [torch.randn(5, 3, 8, 8)], wb.CalibrationError, "batch 0")


def test_nan_in_weight_names_the_parameter():
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    expect_clean_failure(model, torch.randn(3, 4), wb.NonFiniteError, r"'2\.weight'")


def test_inf_in_batchnorm_statistics_names_the_buffer():
    model = small_cnn().eval()
    model[1].running_var[2] = float("inf")
    expect_clean_failure(model, images(), wb.NonFiniteError, r"'1\.running_var'")


def test_nan_in_calibration_data_names_the_layer_input():
    batch = torch.randn(3, 4)
    batch[1, 2] = float("nan")
    expect_clean_failure(mlp(), [batch], wb.NonFiniteError, r"input of 0\b")


def test_unknown_preset():
    with pytest.raises(wb.ConfigError, match="unknown preset 'int9'; choose one of int8"):
        wb.QuantConfig.preset("int9")
    expect_clean_failure(mlp(), torch.randn(3, 4), wb.ConfigError, "int9", config="int9")


def test_unknown_observer():
    with pytest.raises(wb.ConfigError, match="unknown observer 'kl'"):
        wb.QuantConfig(observer="kl")
    with pytest.raises(wb.ConfigError, match="minmax, percentile, mse, entropy"):
        wb.QuantConfig.preset("int8", observer="kl")
    with pytest.raises(wb.ConfigError, match="weight_observer"):
        wb.QuantConfig(weight_observer="entropy")


@pytest.mark.parametrize("config", [5, object(), wb.Scheme(8)])
def test_config_of_the_wrong_type(config):
    expect_clean_failure(mlp(), torch.randn(3, 4), wb.ConfigError, "QuantConfig", config=config)


@pytest.mark.parametrize("model", [lambda x: x, "model", None, [nn.Linear(2, 2)]])
def test_not_a_module(model):
    expect_clean_failure(model, torch.randn(3, 4), wb.ModelError, "torch.nn.Module")


@pytest.mark.parametrize("data,match", [(None, "is None"), (5, "not iterable"), (["x"], "str")])
def test_calib_data_of_the_wrong_type(data, match):
    expect_clean_failure(mlp(), data, wb.CalibrationError, match)


def test_bad_num_batches():
    expect_clean_failure(
        mlp(), torch.randn(3, 4), wb.CalibrationError, "num_batches", num_batches=0
    )
    for search in (wb.sensitivity, wb.auto_mixed_precision):
        with pytest.raises(wb.CalibrationError, match="num_batches must be >= 1, got 0"):
            search(mlp(), torch.randn(3, 4), eval_fn=lambda m: 0.0, num_batches=0, progress=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"percentile": 20.0}, "percentile"),
        ({"activation": wb.Scheme(8, False, per_channel=True)}, "per-tensor activation"),
        ({"weight": "int8"}, "Scheme"),
        ({"activation": "uint8"}, "Scheme or None"),
    ],
)
def test_bad_config_fields(kwargs, match):
    with pytest.raises(wb.ConfigError, match=match):
        wb.QuantConfig(**kwargs)


def test_errors_are_also_builtin_exceptions():
    # code that already catches ValueError / TypeError keeps working
    assert issubclass(wb.ConfigError, ValueError)
    assert issubclass(wb.CalibrationError, ValueError)
    assert issubclass(wb.NonFiniteError, ValueError)
    assert issubclass(wb.ModelError, TypeError)
