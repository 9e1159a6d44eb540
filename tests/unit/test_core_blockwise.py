"""Block-wise (group_size) schemes against an independent NumPy reference and the ONNX reference
implementation of DequantizeLinear with ``block_size`` (opset 21)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import workbench as wb
from workbench.core import fake_quantize, fake_quantize_learned_scale
from workbench.core.observers import weight_range_mse
from workbench.errors import ConfigError


@st.composite
def weight_and_scheme(draw):
    """A random [out, in] weight (in often not a multiple of the group) and a block-wise scheme."""
    group = draw(st.sampled_from([16, 32, 64]))
    out = draw(st.integers(1, 5))
    columns = draw(st.integers(1, 3 * group + 7))
    scheme = wb.Scheme(
        bits=draw(st.integers(2, 8)),
        symmetric=draw(st.booleans()),
        per_channel=True,
        axis=0,
        narrow_range=draw(st.booleans()),
        group_size=group,
    )
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    magnitude = draw(st.sampled_from([1e-4, 0.05, 1.0, 300.0]))
    offset = draw(st.sampled_from([0.0, 0.7, -2.0]))
    x = (torch.randn(out, columns, generator=generator) + offset) * magnitude
    zeros = torch.rand(out, columns, generator=generator) < draw(st.sampled_from([0.0, 0.3]))
    return torch.where(zeros, torch.zeros_like(x), x).to(torch.float32), scheme


def numpy_blockwise(x: np.ndarray, scheme: wb.Scheme):
    """The seed's formulas, group by group, in float32 NumPy: codes, scales, zero points."""
    out, columns = x.shape
    g = scheme.group_size
    groups = -(-columns // g)
    scale = np.zeros((out, groups), np.float32)
    zero = np.zeros((out, groups), np.float32)
    codes = np.zeros_like(x)
    eps = np.float32(np.finfo(np.float32).eps)
    for row in range(out):
        for group in range(groups):
            values = x[row, group * g : (group + 1) * g]
            low = np.float32(min(values.min(), 0.0))
            high = np.float32(max(values.max(), 0.0))
            if scheme.symmetric:
                s = max(np.float32(max(-low, high)) / np.float32(scheme.quant_max), eps)
                z = np.float32(0.0)
            else:
                levels = np.float32(scheme.quant_max - scheme.quant_min)
                s = max(np.float32(high - low) / levels, eps)
                z = np.clip(scheme.quant_min - np.rint(low / s), scheme.quant_min, scheme.quant_max)
            q = np.rint(values * (np.float32(1.0) / np.float32(s))) + z
            codes[row, group * g : (group + 1) * g] = np.clip(q, scheme.quant_min, scheme.quant_max)
            scale[row, group], zero[row, group] = s, z
    return codes, scale, zero


@settings(max_examples=150, deadline=None)
@given(weight_and_scheme())
def test_blockwise_quantize_equals_numpy_reference(case):
    x, scheme = case
    qt = wb.quantize_tensor(x, scheme)
    codes, scale, zero = numpy_blockwise(x.numpy(), scheme)
    assert tuple(qt.scale.shape) == (x.shape[0], -(-x.shape[1] // scheme.group_size))
    np.testing.assert_array_equal(qt.scale.numpy(), scale)
    np.testing.assert_array_equal(qt.zero_point.numpy(), zero.astype(np.int32))
    np.testing.assert_array_equal(qt.q.numpy().astype(np.float32), codes)
    g = scheme.group_size
    expected = (codes - np.repeat(zero, g, axis=1)[:, : x.shape[1]]) * np.repeat(scale, g, axis=1)[
        :, : x.shape[1]
    ]
    np.testing.assert_array_equal(qt.dequantize().numpy(), expected.astype(np.float32))
    # the fake-quant path (grouped view through PyTorch's per-channel kernel) agrees bit for bit
    fake = fake_quantize(x, qt.scale, qt.zero_point, scheme)
    assert torch.equal(fake, qt.dequantize())


@settings(max_examples=60, deadline=None)
@given(weight_and_scheme())
def test_blockwise_dequantize_equals_onnx_reference_block_size(case):
    x, scheme = case
    qt = wb.quantize_tensor(x, scheme)
    code_type = TensorProto.INT8 if scheme.signed else TensorProto.UINT8
    graph = helper.make_graph(
        [
            helper.make_node(
                "DequantizeLinear", ["q", "s", "z"], ["y"], axis=1, block_size=scheme.group_size
            )
        ],
        "dq",
        [
            helper.make_tensor_value_info("q", code_type, list(x.shape)),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, list(qt.scale.shape)),
            helper.make_tensor_value_info("z", code_type, list(qt.scale.shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    code_np = np.int8 if scheme.signed else np.uint8
    (reference,) = ReferenceEvaluator(model).run(
        None,
        {
            "q": qt.q.numpy(),
            "s": qt.scale.numpy(),
            "z": qt.zero_point.numpy().astype(code_np),
        },
    )
    np.testing.assert_allclose(qt.dequantize().numpy(), reference, rtol=1e-6, atol=0)


def test_grouped_fake_quant_gradients_follow_the_ste():
    scheme = wb.Scheme(4, True, True, 0, group_size=16)
    x = torch.randn(3, 40)
    qt = wb.quantize_tensor(x, scheme)
    scale = qt.scale.clone()
    scale[:, 0] *= 0.5  # the first group of every row now clips its largest values
    x.requires_grad_(True)
    fake_quantize(x, scale, qt.zero_point, scheme).sum().backward()
    rounded = torch.round(x.detach() * (1.0 / scale).repeat_interleave(16, 1)[:, :40])
    inside = (rounded >= -8) & (rounded <= 7)
    assert torch.equal(x.grad, inside.to(torch.float32))
    assert (x.grad == 0).any()
    learned = scale.clone().requires_grad_(True)
    out = fake_quantize_learned_scale(x.detach(), learned, qt.zero_point, scheme)
    assert torch.equal(out, fake_quantize(x.detach(), scale, qt.zero_point, scheme))
    out.pow(2).sum().backward()
    assert learned.grad.shape == (3, 3) and (learned.grad != 0).all()


def test_mse_weight_range_per_group_is_no_worse_than_minmax():
    torch.manual_seed(0)
    weight = torch.randn(8, 96) * torch.rand(8, 96).pow(4) * 3  # heavy tails
    scheme = wb.Scheme(3, True, True, 0, group_size=32)

    def error(low, high):
        scale, zero = wb.core.qparams_from_range(low, high, scheme)
        deq = wb.core.dequantize_with(
            wb.core.quantize_with(weight, scale, zero, scheme), scale, zero, scheme
        )
        return ((weight - deq) ** 2).reshape(8, 3, 32).sum(dim=2)

    low, high = weight_range_mse(weight, scheme)
    assert low.shape == (8, 3)
    from workbench.core.qtensor import tensor_range

    minmax = error(*tensor_range(weight, scheme))
    searched = error(low, high)
    assert (searched <= minmax + 1e-9).all() and (searched < minmax).any()


@pytest.mark.parametrize("size", [8, 24, 512, 32.0, True, "32"])
def test_bad_group_sizes_raise_one_clear_error(size):
    with pytest.raises(ConfigError, match=r"group_size must be a power of two in 16\.\.256"):
        wb.Scheme(4, True, True, 0, group_size=size)


def test_group_size_needs_per_channel_axis_0_and_2d_weights():
    with pytest.raises(ConfigError, match="pass per_channel=True, axis=0"):
        wb.Scheme(4, True, False, group_size=32)
    with pytest.raises(ConfigError, match=r"2-D Linear weights"):
        wb.quantize_tensor(torch.randn(4, 3, 3, 3), wb.Scheme(4, True, True, group_size=16))
    with pytest.raises(ConfigError, match=r"block-wise .*activations are not supported"):
        wb.QuantConfig(activation=wb.Scheme(8, False, True, group_size=32))


def test_block_wise_scheme_on_a_conv_names_the_override():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    config = wb.QuantConfig.preset("int4-weight-g32")
    with pytest.raises(ConfigError, match=r"'0' is a Conv2d.*overrides=\{'0'"):
        wb.ptq(model, [torch.randn(2, 3, 8, 8)], config=config)
    fixed = wb.QuantConfig.preset(
        "int4-weight-g32", overrides={"0": {"weight": wb.Scheme(4, True, True)}}
    )
    result = wb.ptq(model, [torch.randn(2, 3, 8, 8)], config=fixed)
    assert result.model[2].weight_quantizer.scale.shape == (5, 5)  # 144 inputs: 4 full + 16


def test_describe_names_the_group():
    assert wb.Scheme(4, True, True, group_size=128).describe() == "int4 sym g128"


@pytest.mark.parametrize("symmetric", [True, False])
def test_ptq_quantizes_linear_weights_per_group_and_counts_packed_bytes(symmetric):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 5), nn.ReLU(), nn.Linear(5, 3, bias=False))
    scheme = wb.Scheme(4, symmetric, True, 0, group_size=32)
    config = wb.QuantConfig(weight=scheme, activation=None, weight_observer="minmax")
    result = wb.ptq(model, [torch.randn(4, 100)], config=config)
    layer = result.model[0]
    expected = wb.quantize_tensor(model[0].weight.detach(), scheme).dequantize()
    assert torch.equal(layer.quantized_weight(), expected)
    storage = result.report.storage.set_index("layer")
    groups = 5 * 4  # 100 inputs: groups of 32, 32, 32 and 4
    assert storage.loc["0", "weight_bytes"] == 5 * 100 * 4 // 8
    assert storage.loc["0", "scale_bytes"] == 4 * groups
    assert storage.loc["0", "zero_point_bytes"] == (0 if symmetric else groups * 4 // 8)
    assert storage.loc["2", "scale_bytes"] == 4 * 3  # 5 inputs: one partial group per row
    mse = wb.ptq(
        model,
        [torch.randn(4, 100)],
        config=wb.QuantConfig(weight=scheme, activation=None, weight_observer="mse"),
    )
    error = (mse.model[0].quantized_weight() - model[0].weight).pow(2).sum()
    assert error <= (expected - model[0].weight).pow(2).sum()
