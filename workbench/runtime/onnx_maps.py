"""Who makes and who reads each tensor of an ONNX graph: the one map the graph rewrites, the
fusion check and the parity check share."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import onnx


@dataclass
class TensorMap:
    """``producer[tensor]``: the node writing it; ``consumers[tensor]``: the nodes reading it
    (a node reading a tensor twice is listed twice, as it has two inputs to rewire)."""

    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))

    def add_node(self, node: onnx.NodeProto) -> None:
        for name in node.output:
            if name:
                self.producer[name] = node
        for name in node.input:
            if name:
                self.consumers[name].append(node)

    def remove_node(self, node: onnx.NodeProto) -> None:
        for name in node.output:
            if name in self.producer and _same(self.producer[name], node):
                del self.producer[name]
        for name in node.input:
            users = self.consumers.get(name)
            if users:
                for i, user in enumerate(users):
                    if _same(user, node):
                        del users[i]
                        break

    def users(self, tensor: str) -> list[onnx.NodeProto]:
        return self.consumers.get(tensor, [])


def _same(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    return a is b or a == b


def tensor_map(graph: onnx.GraphProto) -> TensorMap:
    """The producer / consumer map of every node of ``graph``."""
    index = TensorMap()
    for node in graph.node:
        index.add_node(node)
    return index
