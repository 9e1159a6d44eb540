"""The export's topological sort: every node after its inputs' producers, an already sorted
graph unchanged, a cycle one clear error; checked by onnx.checker and onnx.reference."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from workbench.runtime.qdq_graph import topological_sort


def _chain_graph(length: int = 40) -> onnx.ModelProto:
    """x -> Relu -> Add(., x) -> Relu -> ... with a skip from every second node."""
    nodes, previous = [], "x"
    for i in range(length):
        if i % 2:
            nodes.append(helper.make_node("Add", [previous, f"t{i - 1}"], [f"t{i}"], name=f"n{i}"))
        else:
            nodes.append(helper.make_node("Relu", [previous], [f"t{i}"], name=f"n{i}"))
        previous = f"t{i}"
    nodes.append(helper.make_node("Identity", [previous], ["y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_shuffled_graph_is_sorted_and_computes_the_same():
    model = _chain_graph()
    x = np.array([-1.0, 0.5, 2.0], dtype=np.float32)
    expected = ReferenceEvaluator(model).run(None, {"x": x})[0]
    original = [node.name for node in model.graph.node]
    shuffled = list(model.graph.node)
    random.Random(0).shuffle(shuffled)
    copies = [onnx.NodeProto.FromString(node.SerializeToString()) for node in shuffled]
    del model.graph.node[:]
    model.graph.node.extend(copies)
    topological_sort(model.graph)
    onnx.checker.check_model(model)  # fails on a node before its input's producer
    assert [node.name for node in model.graph.node] == original  # the only valid order here
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {"x": x})[0], expected)


def test_a_sorted_graph_keeps_its_order():
    model = _chain_graph()
    nodes = list(model.graph.node)
    # two independent branches: any interleaving is valid, the given one is kept
    extra = helper.make_node("Neg", ["x"], ["neg"], name="side")
    model.graph.node.insert(3, extra)
    before = [node.name for node in model.graph.node]
    topological_sort(model.graph)
    assert [node.name for node in model.graph.node] == before
    assert len(model.graph.node) == len(nodes) + 1


def test_a_cycle_is_one_clear_error():
    model = _chain_graph(4)
    model.graph.node[0].input[0] = "t3"  # n0 reads what n3 makes, n3 depends on n0
    with pytest.raises(ValueError, match="cycle or a missing input near node 'n0'"):
        topological_sort(model.graph)
