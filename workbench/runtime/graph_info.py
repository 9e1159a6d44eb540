"""The map an exported QDQ model carries in its metadata: which node and weight initializer
each quantized layer became, and which tensor each output quantizer's QuantizeLinear writes.
Written by ``qdq_graph.finalize_qdq_graph``, read by the fusion and parity checks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import onnx
from onnx import helper

METADATA_KEY = "workbench.quantized_layers"

SITES_KEY = "workbench.quantized_outputs"


@dataclass
class QuantizedLayerInfo:
    """Where one quantized layer sits in the exported graph."""

    name: str
    op_type: str  # "MatMul" or "Conv"
    node: str
    weight: str  # the int8 / uint8 weight initializer
    output: str  # the layer's output tensor (for a Conv: before its output Q)
    call: int = 0  # the call site (node ``layer#n``) of a layer called at several sites


@dataclass
class GraphInfo:
    layers: list[QuantizedLayerInfo] = field(default_factory=list)
    sites: dict[str, str] = field(default_factory=dict)  # output quantizer -> Q output tensor

    def to_metadata(self, model: onnx.ModelProto) -> None:
        layers = [vars(layer) for layer in self.layers]
        helper.set_model_props(
            model,
            {METADATA_KEY: json.dumps(layers), SITES_KEY: json.dumps(self.sites)},
        )


def read_graph_info(model: onnx.ModelProto) -> GraphInfo:
    """The layer / output-quantizer map written by :func:`finalize_qdq_graph`."""
    props = {prop.key: prop.value for prop in model.metadata_props}
    layers = [QuantizedLayerInfo(**row) for row in json.loads(props.get(METADATA_KEY, "[]"))]
    return GraphInfo(layers, json.loads(props.get(SITES_KEY, "{}")))
