"""The QDQ graph passes change the graph's structure but never its values (checked with
onnx.reference on hand-built graphs), and they produce the patterns ONNX Runtime fuses."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from workbench.runtime.qdq_graph import _Graph, finalize_qdq_graph, space_to_depth_stem


def make_model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    return model


def scalar(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def run(model: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    return ReferenceEvaluator(model).run(None, feeds)


def ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def float_input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def qdq_pool_flatten_model() -> onnx.ModelProto:
    """Q -> DQ -> MaxPool -> Flatten -> Q (same params) -> DQ -> MatMul, and a second Q with
    other params on the same tensor (a requantization that must stay)."""
    rng = np.random.default_rng(0)
    inits = [
        scalar("s", 0.05, np.float32),
        scalar("z", 7, np.uint8),
        scalar("s2", 0.03, np.float32),
        scalar("z2", 0, np.uint8),
        numpy_helper.from_array(rng.integers(-127, 127, (4, 3)).astype(np.int8), "w"),
        scalar("ws", 0.01, np.float32),
        scalar("wz", 0, np.int8),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("MaxPool", ["xd"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("QuantizeLinear", ["f", "s", "z"], ["fq"]),
        helper.make_node("DequantizeLinear", ["fq", "s", "z"], ["fd"]),
        helper.make_node("QuantizeLinear", ["f", "s", "z"], ["fq_twin"]),
        helper.make_node("DequantizeLinear", ["fq_twin", "s", "z"], ["fd_twin"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
        helper.make_node("MatMul", ["fd", "wd"], ["y1"]),
        helper.make_node("MatMul", ["fd_twin", "wd"], ["y2"]),
        helper.make_node("QuantizeLinear", ["f", "s2", "z2"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "s2", "z2"], ["y3"]),
    ]
    outputs = [float_input("y1", [2, 3]), float_input("y2", [2, 3]), float_input("y3", [2, 4])]
    return make_model(nodes, [float_input("x", [2, 1, 4, 4])], outputs, inits)


def test_passes_keep_every_value():
    model = qdq_pool_flatten_model()
    x = np.random.default_rng(1).normal(size=(2, 1, 4, 4)).astype(np.float32)
    before = run(model, x=x)
    finalize_qdq_graph(model)
    onnx.checker.check_model(model)
    after = run(model, x=x)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_maxpool_and_flatten_run_on_codes_and_identity_requantization_is_gone():
    model = qdq_pool_flatten_model()
    finalize_qdq_graph(model)
    g = _Graph(model.graph)
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    assert g.producer[pool.input[0]].op_type == "QuantizeLinear"  # MaxPool reads uint8 codes
    # Q(DQ(q)) with the same scale / zero point is gone; the one with other params stays
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(n.input[1] for n in quantizers) == ["s", "s2"]
    for matmul in (n for n in model.graph.node if n.op_type == "MatMul"):
        assert g.producer[matmul.input[0]].op_type == "DequantizeLinear"
        assert g.producer[matmul.input[1]].op_type == "DequantizeLinear"


def test_each_dequantize_has_one_consumer():
    model = qdq_pool_flatten_model()
    finalize_qdq_graph(model)
    g = _Graph(model.graph)
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            assert len(g.consumers[node.output[0]]) + (node.output[0] in g.outputs) == 1


@pytest.mark.parametrize(
    ("channels", "kernel", "stride", "pad", "size"),
    [(3, 7, 2, 3, 20), (3, 3, 2, 1, 9), (1, 5, 3, 2, 13), (2, 4, 2, 0, 10)],
)
def test_space_to_depth_stem_gives_the_same_values(channels, kernel, stride, pad, size):
    rng = np.random.default_rng(2)
    inits = [
        scalar("s", 0.02, np.float32),
        scalar("z", 131, np.uint8),
        numpy_helper.from_array(
            rng.integers(-127, 127, (5, channels, kernel, kernel)).astype(np.int8), "w"
        ),
        numpy_helper.from_array(rng.uniform(0.01, 0.02, 5).astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(5, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node(
            "Conv",
            ["xd", "wd"],
            ["y"],
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad] * 4,
        ),
    ]
    out = (size + 2 * pad - kernel) // stride + 1
    model = make_model(
        nodes,
        [float_input("x", [2, channels, size, size])],
        [float_input("y", [2, 5, out, out])],
        inits,
    )
    x = rng.normal(size=(2, channels, size, size)).astype(np.float32)
    before = run(model, x=x)[0]
    growth = (-(-kernel // stride) * stride) ** 2 / kernel**2
    if growth > 1.5:  # by default only stems whose padded kernel grows little are rewritten
        assert not space_to_depth_stem(model, _Graph(model.graph))
    assert space_to_depth_stem(model, _Graph(model.graph), max_kernel_growth=2.0)
    onnx.checker.check_model(model)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert {a.name: list(a.ints) for a in conv.attribute}["strides"] == [1, 1]
    np.testing.assert_allclose(run(model, x=x)[0], before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("axis_a", "axis_b", "merged"), [(0, 1, False), (1, 1, True), (0, 0, True)]
)
def test_per_channel_quantizers_merge_only_on_the_same_axis(axis_a, axis_b, merged):
    """Two per-channel QuantizeLinear nodes with equal scales on a [2, 2] tensor are the same
    quantization only along the same axis (axis 0 is not axis 1)."""
    from workbench.runtime.qdq_graph import merge_duplicate_quantize

    scale = numpy_helper.from_array(np.array([0.1, 0.2], np.float32), "scale")
    zero = numpy_helper.from_array(np.array([0, 0], np.uint8), "zero")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["qa"], axis=axis_a),
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["qb"], axis=axis_b),
        helper.make_node("DequantizeLinear", ["qa", "scale", "zero"], ["a"], axis=axis_a),
        helper.make_node("DequantizeLinear", ["qb", "scale", "zero"], ["b"], axis=axis_b),
    ]
    outputs = [float_input("a", [2, 2]), float_input("b", [2, 2])]
    model = make_model(nodes, [float_input("x", [2, 2])], outputs, [scale, zero])
    x = np.array([[0.31, 0.52], [0.13, 0.77]], np.float32)
    expected = run(model, x=x)
    g = _Graph(model.graph)
    assert merge_duplicate_quantize(g, {}) is merged
    assert ops(model).count("QuantizeLinear") == (1 if merged else 2)
    for got, want in zip(run(model, x=x), expected, strict=True):
        np.testing.assert_array_equal(got, want)
