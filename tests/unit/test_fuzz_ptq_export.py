"""Property: over configs x small random models x batch shapes, PTQ -> ONNX export -> ONNX
Runtime either succeeds with ONNX Runtime computing what the simulated model computes (closer
to it than the simulation is to FP32: tests/parity_bounds.py) or raises a WorkbenchError; never
another exception, never a modified user model or data (tests/unit/model_guard.py). 200
derandomized examples, each tiny, of which at least ``MIN_EXPORTED_SHARE`` must export (an
error is allowed, not the rule).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from model_guard import Snapshot
from torch import nn

import workbench as wb
from tests.parity_bounds import assert_within_quantization_error

PARITY_COSINE = 0.999


class Residual(nn.Module):
    """x + f(x): the add's quantizer and the shared input."""

    def __init__(self, width: int, bn: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width) if bn else nn.Identity()

    def forward(self, x):
        return x + torch.relu(self.bn(self.fc(x)))


class Shared(nn.Module):
    """One Linear called twice (a shared module)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


class ConvNet(nn.Module):
    def __init__(self, channels: int, width: int, bn: bool, out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels) if bn else nn.Identity()
        self.head = nn.Linear(channels * width * width, out)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


@st.composite
def models(draw):
    """(model, input sample shape): Linear / Conv / BN / residual / shared modules."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["mlp", "conv", "residual", "shared"]))
    width = draw(st.integers(1, 6))
    out = draw(st.integers(1, 4))
    bn = draw(st.booleans())
    if kind == "conv":
        side = draw(st.integers(3, 5))
        model = ConvNet(draw(st.integers(1, 3)), side, bn, out)
        shape = (1, side, side)
    elif kind == "residual":
        model = nn.Sequential(Residual(width, bn), nn.Linear(width, out))
        shape = (width,)
    elif kind == "shared":
        model = nn.Sequential(Shared(width), nn.Linear(width, out))
        shape = (width,)
    else:
        layers = [nn.Linear(width, width), nn.ReLU()]
        if bn:
            layers.insert(1, nn.BatchNorm1d(width))
        model = nn.Sequential(*layers, nn.Linear(width, out))
        shape = (width,)
    for module in model.modules():  # BN statistics that are not the defaults
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    model.train(draw(st.booleans()))  # training mode must give a warning, never a mutation
    return model, shape


@st.composite
def configs(draw):
    preset = draw(st.sampled_from(["int8", "int8-per-tensor", "int8-weight-only", "w4a4"]))
    observer = draw(st.sampled_from(["minmax", "percentile", "mse", "entropy"]))
    weight_observer = draw(st.sampled_from(["minmax", "mse"]))
    return wb.QuantConfig.preset(preset, observer=observer, weight_observer=weight_observer)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(a @ b / norms)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# Most drawn examples are ordinary models and data: a fuzz run where nearly all of them raise
# (a bug turning every export into an ExportError) must fail, not pass on the error branch.
# Measured here: all 200 derandomized examples export; 0.9 leaves room for a documented error
# on a new draw (hypothesis' version changes the examples) and fails when most examples raise.
MIN_EXPORTED_SHARE = 0.9


def test_ptq_export_runs_in_onnxruntime_or_raises_a_workbench_error(folder):
    outcomes: dict[str, int] = {"exported": 0, "error": 0}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(
        model_and_shape=models(),
        config=configs(),
        calib_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
        example_size=st.integers(1, 4),
        data_scale=st.sampled_from([0.0, 1e-3, 1.0, 1e3]),
    )
    def one_example(model_and_shape, config, calib_sizes, example_size, data_scale):
        outcomes[
            export_and_compare(
                folder, model_and_shape, config, calib_sizes, example_size, data_scale
            )
        ] += 1

    one_example()
    total = outcomes["exported"] + outcomes["error"]
    assert outcomes["exported"] >= MIN_EXPORTED_SHARE * total, outcomes


def export_and_compare(folder, model_and_shape, config, calib_sizes, example_size, data_scale):
    """One example: ``"exported"`` (ONNX Runtime computes the simulation) or ``"error"`` (a
    WorkbenchError, nothing modified); any other exception or a mismatch fails."""
    from workbench.runtime.ort_session import make_session, run_session

    model, shape = model_and_shape
    calib = [torch.randn(n, *shape) * data_scale for n in calib_sizes]
    example = torch.randn(example_size, *shape)
    snapshot = Snapshot(model, calib, example)
    path = folder / "model.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # training mode, constant data: documented warnings
            result = wb.ptq(model, calib, config=config, progress=False)
            written = result.export_onnx(path, example, check_fusion=False)
            # graph optimizations off: ONNX Runtime runs the QDQ graph as written (its fused
            # integer kernels round differently, which parity_check measures and reports)
            onnx_out = run_session(make_session(written, optimize=False), example)[0]
    except wb.WorkbenchError as error:
        event(f"{type(error).__name__}: {str(error)[:60]}")
        snapshot.assert_unchanged()
        return "error"
    event("exported, parity checked")
    snapshot.assert_unchanged()
    with torch.no_grad():
        simulated = result.model(example).numpy()
        fp32 = result.fp32_model(example).numpy()
    assert onnx_out.shape == simulated.shape
    assert_within_quantization_error(onnx_out, simulated, fp32)
    return "exported"


def test_saturated_int32_bias_keeps_its_sign(folder):
    """Calibration on zeros gives an input scale of ~1e-7, so bias / (s_x * s_w) exceeds the
    INT32 range: the exported code saturates at the top (float32 rounds 2**31 - 1 up to
    2**31, which wrapped to -2**31), and ONNX Runtime still computes the simulation."""
    import onnx
    from onnx import numpy_helper

    from workbench.runtime.ort_session import make_session, run_session

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    example = torch.randn(1, 4)
    with pytest.warns(RuntimeWarning, match="constant"):
        result = wb.ptq(model, [torch.zeros(1, 4)], progress=False)
    path = result.export_onnx(folder / "saturated.onnx", example, check_fusion=False)
    folded_bias = result.model[0].layer.bias.detach().numpy()
    codes = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(path)).graph.initializer
        if numpy_helper.to_array(t).dtype == np.int32 and numpy_helper.to_array(t).any()
    ]
    first = next(c for c in codes if c.shape == folded_bias.shape)
    saturated = np.abs(first.astype(np.int64)) > 2**30
    assert saturated.any()
    assert (np.sign(first[saturated]) == np.sign(folded_bias[saturated])).all()
    for optimize in (False, True):
        onnx_out = run_session(make_session(path, optimize=optimize), example)[0]
        with torch.no_grad():
            assert cosine(onnx_out, result.model(example).numpy()) >= PARITY_COSINE
