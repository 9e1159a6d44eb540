"""The lookup index the QDQ graph passes share (``qdq_graph``, ``conv_rewrites``): producers,
consumers and initializers of one ONNX graph, kept up to date by the edits made through it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from workbench.runtime.onnx_maps import tensor_map


class GraphIndex:
    """Lookup tables over ``graph``: the producer / consumer map (``onnx_maps``) is kept up to
    date by the edits below and rebuilt (``refresh``) at most once per pass."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.refresh()

    def refresh(self) -> None:
        self.tensors = tensor_map(self.graph)
        self.producer = self.tensors.producer
        self.consumers = self.tensors.consumers
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.outputs = {out.name for out in self.graph.output}

    def array(self, name: str) -> np.ndarray | None:
        init = self.initializers.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def replace_uses(self, old: str, new: str) -> None:
        """Every node reading ``old`` reads ``new`` instead."""
        users = self.consumers.pop(old, [])
        seen: set[int] = set()
        for node in users:
            if id(node) in seen:
                continue
            seen.add(id(node))
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        self.consumers[new].extend(users)

    def insert(self, position: int, node: onnx.NodeProto) -> None:
        self.graph.node.insert(position, node)
        self.tensors.add_node(self.graph.node[position])

    def remove(self, node: onnx.NodeProto) -> None:
        self.tensors.remove_node(node)
        self.graph.node.remove(node)

    def rename_initializer(self, old: str, new: str) -> None:
        if old == new or old not in self.initializers or new in self.initializers:
            return
        init = self.initializers.pop(old)
        init.name = new
        self.initializers[new] = init
        self.replace_uses(old, new)


def per_tensor_dq(g: GraphIndex, name: str) -> onnx.NodeProto | None:
    node = g.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    scale = g.array(node.input[1])
    return node if scale is not None and scale.ndim == 0 else None


def unique_name(g: GraphIndex, base: str) -> str:
    used = set(g.producer) | set(g.initializers) | {i.name for i in g.graph.input}
    name, index = base, 0
    while name in used:
        index += 1
        name = f"{base}_{index}"
    return name


def conv_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
