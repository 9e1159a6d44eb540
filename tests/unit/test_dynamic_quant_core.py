"""workbench.core.dynamic_quant against ONNX Runtime's DynamicQuantizeLinear kernel and the ONNX
reference implementation, on random tensors and the edge cases (all-positive, all-negative,
constant, zero, exact halves)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from workbench.core.dynamic_quant import dynamic_quantize, fake_quantize_dynamic
from workbench.errors import NonFiniteError


@pytest.fixture(scope="module")
def dynamic_quantize_linear():
    """``x -> (codes, scale, zero point)`` from ORT's kernel and from onnx.reference."""
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.UINT8, None),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("z", TensorProto.UINT8, None),
    ]
    graph = helper.make_graph(
        [node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], outputs
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    reference = ReferenceEvaluator(model)
    return (
        lambda x: session.run(None, {"x": x.numpy()}),
        lambda x: reference.run(None, {"x": x.numpy()}),
    )


def _check_against_references(x: torch.Tensor, references) -> None:
    run_ort, run_reference = references
    codes, scale, zero_point = dynamic_quantize(x)
    ort_codes, ort_scale, ort_zero = run_ort(x)
    np.testing.assert_array_equal(codes.numpy(), ort_codes)
    assert scale.dtype == torch.float32 and scale.item() == ort_scale.item()
    assert zero_point.item() == int(ort_zero)
    ref_codes, ref_scale, ref_zero = run_reference(x)
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    assert zero_point.item() == int(ref_zero)
    # onnx.reference takes (0 - 0) / 255 as the scale of a single-valued tensor, ORT 1.0: the
    # dequantized values are the same
    ref_values = (ref_codes.astype(np.float32) - float(ref_zero)) * ref_scale
    fake = fake_quantize_dynamic(x)
    np.testing.assert_array_equal(fake.numpy(), ref_values.astype(np.float32))


@st.composite
def activation_tensors(draw):
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    magnitude = draw(st.sampled_from([1e-5, 0.01, 1.0, 30.0, 5e3]))
    offset = draw(st.sampled_from([0.0, 0.7, -1.3, 4.0, -4.0]))  # +-4: all one sign
    x = (torch.randn(shape, generator=generator) + offset) * magnitude
    zeros = torch.rand(shape, generator=generator) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    return torch.where(zeros, torch.zeros_like(x), x).to(torch.float32)


@settings(max_examples=300, deadline=None)
@given(activation_tensors())
def test_random_tensors_match_onnx_runtime_and_onnx_reference(dynamic_quantize_linear, x):
    _check_against_references(x, dynamic_quantize_linear)


@pytest.mark.parametrize(
    "values",
    [
        [0.0, 0.0, 0.0],  # zero tensor
        [3.0, 3.0],  # constant positive
        [-3.0, -3.0, -3.0],  # constant negative
        [0.1, 2.0, 7.5],  # all positive: zero point 0
        [-0.1, -2.0, -7.5],  # all negative: zero point 255
        [-2.5, 0.5, 1.5, 2.5, 3.5, 252.5],  # scale 1, zero point 2.5 and codes at halves
        [-1.5, 253.5],  # zero point 1.5 -> 2
    ],
)
def test_edge_cases_match_onnx_runtime(dynamic_quantize_linear, values):
    _check_against_references(torch.tensor(values, dtype=torch.float32), dynamic_quantize_linear)


def test_halves_round_to_even():
    codes, scale, zero_point = dynamic_quantize(torch.tensor([-2.5, 0.5, 1.5, 2.5, 252.5]))
    assert scale.item() == 1.0
    assert zero_point.item() == 2  # -(-2.5) / 1 = 2.5 -> 2 (even), not 3
    assert codes.tolist() == [0, 2, 4, 4, 254]  # 0.5 + 2 -> 2, 1.5 -> 4, 2.5 -> 4


def test_range_includes_zero_so_zero_is_exact():
    x = torch.tensor([[0.0, 3.7, 9.1], [0.0, -0.2, 1.0]])
    assert (fake_quantize_dynamic(x)[x == 0] == 0).all()
    positive = torch.tensor([5.0, 6.0, 7.0])
    _, _, zero_point = dynamic_quantize(positive)
    assert zero_point.item() == 0  # min widened to 0


def test_each_input_gets_its_own_scale():
    small = torch.linspace(-1, 1, 50)
    large = small * 64  # a power of two: every step of the computation scales exactly
    assert torch.equal(fake_quantize_dynamic(large), fake_quantize_dynamic(small) * 64)
    assert (fake_quantize_dynamic(small) - small).abs().max() <= (2 / 255) / 2 + 1e-7


def test_gradient_passes_straight_through():
    x = torch.randn(4, 5, requires_grad=True)
    fake_quantize_dynamic(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_non_finite_input_is_one_clear_error():
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        dynamic_quantize(torch.tensor([1.0, float("nan")]), "input of fc")
