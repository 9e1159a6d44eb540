"""workbench.core against trusted references: PyTorch's fake-quant kernels and observers, and
the ONNX reference implementation of QuantizeLinear."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import workbench as wb
from workbench.core import dequantize_with, fake_quantize, quantize_with


@st.composite
def tensor_and_scheme(draw, max_dims: int = 4):
    """A random float32 tensor (with exact zeros, repeats and a random offset) and a scheme."""
    dims = draw(st.integers(1, max_dims))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=dims, max_size=dims)))
    per_channel = draw(st.booleans())
    axis = draw(st.integers(-dims, dims - 1)) if per_channel else 0
    scheme = wb.Scheme(
        bits=draw(st.integers(2, 8)),
        symmetric=draw(st.booleans()),
        per_channel=per_channel,
        axis=axis,
        narrow_range=draw(st.booleans()),
    )
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    magnitude = draw(st.sampled_from([1e-6, 1e-3, 0.05, 1.0, 37.0, 1e4]))
    offset = draw(st.sampled_from([0.0, 0.5, -2.0]))
    x = (torch.randn(shape, generator=generator) + offset) * magnitude
    zeros = torch.rand(shape, generator=generator) < draw(st.sampled_from([0.0, 0.3]))
    x = torch.where(zeros, torch.zeros_like(x), x)
    return x.to(torch.float32), scheme


def torch_fake_quant(x: torch.Tensor, qt: wb.QTensor) -> torch.Tensor:
    s = qt.scheme
    if s.per_channel:
        return torch.fake_quantize_per_channel_affine(
            x, qt.scale, qt.zero_point, s.axis % x.dim(), s.quant_min, s.quant_max
        )
    return torch.fake_quantize_per_tensor_affine(
        x, qt.scale, qt.zero_point, s.quant_min, s.quant_max
    )


@settings(max_examples=400)
@given(tensor_and_scheme())
def test_dequantize_equals_torch_fake_quant_bit_for_bit(case):
    x, scheme = case
    qt = wb.quantize_tensor(x, scheme)
    expected = torch_fake_quant(x, qt)
    got = qt.dequantize()
    assert got.dtype == torch.float32
    assert torch.equal(got, expected), (got - expected).abs().max()


def numpy_fake_quantize(x: np.ndarray, qt: wb.QTensor) -> np.ndarray:
    """The seed's formula written out in float32 NumPy, without torch:
    q = clamp(round_half_even(x / s) + z, q_min, q_max), x' = (q - z) * s, where x / s is
    x times the float32 reciprocal 1 / s (as PyTorch's and ONNX Runtime's CPU kernels do)."""
    s = qt.scheme
    scale = qt.scale.numpy().astype(np.float32)
    zero_point = qt.zero_point.numpy().astype(np.float32)
    if s.per_channel:
        shape = [-1 if d == s.axis % x.ndim else 1 for d in range(x.ndim)]
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    inverse = np.float32(1.0) / scale
    q = np.clip(np.rint(x * inverse) + zero_point, s.quant_min, s.quant_max)
    return ((q - zero_point) * scale).astype(np.float32)


@given(tensor_and_scheme())
def test_core_fake_quantize_equals_the_formula(case):
    x, scheme = case
    qt = wb.quantize_tensor(x, scheme)
    ours = fake_quantize(x, qt.scale, qt.zero_point, scheme).numpy()
    np.testing.assert_array_equal(ours, numpy_fake_quantize(x.numpy(), qt))


@given(tensor_and_scheme())
def test_codes_dtype_and_range(case):
    x, scheme = case
    qt = wb.quantize_tensor(x, scheme)
    assert qt.q.dtype == (torch.int8 if scheme.symmetric else torch.uint8)
    assert qt.q.shape == x.shape
    codes = qt.q.to(torch.int32)
    assert int(codes.min()) >= scheme.quant_min
    assert int(codes.max()) <= scheme.quant_max
    expected_scales = x.shape[scheme.axis % x.dim()] if scheme.per_channel else 1
    assert qt.scale.numel() == expected_scales
    assert qt.scale.dtype == torch.float32
    assert bool((qt.scale > 0).all()) and bool(torch.isfinite(qt.scale).all())
    if scheme.symmetric:
        assert bool((qt.zero_point == 0).all())


@given(tensor_and_scheme())
def test_range_includes_zero_and_covers_every_value(case):
    x, scheme = case
    qt = wb.quantize_tensor(x, scheme)
    deq = qt.dequantize()
    assert bool((deq[x == 0] == 0).all())
    zeros = torch.zeros_like(x)
    zero_codes = quantize_with(zeros, qt.scale, qt.zero_point, scheme)
    assert bool((dequantize_with(zero_codes, qt.scale, qt.zero_point, scheme) == 0).all())
    # min/max qparams clip nothing: every value is within half a step of its code
    axis = scheme.axis % x.dim()
    step = (
        qt.scale
        if qt.scale.dim() == 0
        else qt.scale.reshape([-1 if d == axis else 1 for d in range(x.dim())])
    )
    assert bool(((deq - x).abs() <= step * 0.5 * (1 + 1e-4) + 1e-30).all())


def torch_observer(scheme: wb.Scheme, x: torch.Tensor):
    """PyTorch's own MinMax observer configured to the same integer range."""
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

    symmetric = scheme.symmetric
    kwargs = {
        "dtype": torch.qint8 if symmetric else torch.quint8,
        "quant_min": scheme.quant_min,
        "quant_max": scheme.quant_max,
    }
    if symmetric:
        # torch's symmetric scale is amax / ((q_max - q_min) / 2): ours (amax / q_max) is the
        # same formula on the narrow range [-q_max, q_max].
        kwargs["quant_min"] = -scheme.quant_max
    if scheme.per_channel:
        qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        observer = PerChannelMinMaxObserver(
            ch_axis=scheme.axis % x.dim(), qscheme=qscheme, **kwargs
        )
    else:
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        observer = MinMaxObserver(qscheme=qscheme, **kwargs)
    # torch's per-channel observer needs a second dimension; [C] -> [C, 1] keeps the channels
    observer(x.unsqueeze(-1) if x.dim() == 1 else x)
    return observer.calculate_qparams()


@given(tensor_and_scheme(max_dims=3))
def test_qparams_equal_torch_minmax_observer(case):
    x, scheme = case
    qt = wb.quantize_tensor(x, scheme)
    scale, zero_point = torch_observer(scheme, x)
    assert torch.equal(qt.scale.reshape(-1), scale.to(torch.float32).reshape(-1))
    assert torch.equal(qt.zero_point.reshape(-1).to(torch.int64), zero_point.reshape(-1).long())


def onnx_quantize_linear(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None
) -> np.ndarray:
    """Codes from ONNX's reference QuantizeLinear (opset 19) on a one-node graph."""
    zp_type = TensorProto.INT8 if zero_point.dtype == np.int8 else TensorProto.UINT8
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "quantize",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, list(scale.shape)),
            helper.make_tensor_value_info("zero_point", zp_type, list(zero_point.shape)),
        ],
        [helper.make_tensor_value_info("y", zp_type, list(x.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    (y,) = ReferenceEvaluator(model).run(None, {"x": x, "scale": scale, "zero_point": zero_point})
    return y


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel,axis", [(False, 0), (True, 0), (True, 1), (True, -1)])
def test_codes_agree_with_onnx_reference_quantize_linear(symmetric, per_channel, axis):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(16, 24, 32, generator=generator) * 3.0 + (0.0 if symmetric else 1.0)
    scheme = wb.Scheme(8, symmetric=symmetric, per_channel=per_channel, axis=axis)
    qt = wb.quantize_tensor(x, scheme)
    zp_dtype = np.int8 if symmetric else np.uint8
    onnx_axis = axis % x.dim() if per_channel else None
    expected = onnx_quantize_linear(
        x.numpy(), qt.scale.numpy(), qt.zero_point.numpy().astype(zp_dtype), onnx_axis
    )
    ours = qt.q.numpy()
    assert ours.dtype == expected.dtype
    diff = np.abs(ours.astype(np.int32) - expected.astype(np.int32))
    # ONNX divides by the scale, torch (and we) multiply by 1/scale: at an exact tie the two
    # may round to neighbouring codes, never further apart, and only rarely.
    assert diff.max() <= 1
    assert diff.mean() < 1e-3, f"{int(diff.sum())} of {diff.size} codes differ"


def test_onnx_agreement_is_exact_away_from_ties():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=generator)
    scheme = wb.Scheme(8, symmetric=False)
    qt = wb.quantize_tensor(x, scheme)
    fraction = (x / qt.scale) - torch.floor(x / qt.scale)
    away = (fraction - 0.5).abs() > 1e-3
    expected = onnx_quantize_linear(
        x.numpy(), qt.scale.numpy(), qt.zero_point.numpy().astype(np.uint8), None
    )
    assert np.array_equal(qt.q.numpy()[away.numpy()], expected[away.numpy()])
