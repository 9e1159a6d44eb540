"""Export of a Linear layer with a dynamic input (``activation_mode="dynamic"``) as the pattern
ONNX Runtime's own ``quantize_dynamic`` writes, and which ONNX Runtime fuses into one
``DynamicQuantizeMatMul`` kernel (bias included):

    x -> DynamicQuantizeLinear -> (x_q uint8, s_x, z_x)
    MatMulInteger(x_q, W_q^T int8, z_x, z_w) -> Cast(float) -> Mul(s_x * s_w) -> Add(bias)

The weight is stored transposed (``[in, out]``, one scale per output column when per-channel),
the bias stays FP32 (the input scale changes with every call). The stand-in's torch forward is
the simulation's computation; its ``symbolic`` writes the nodes. A marker node
(``workbench::DynamicWeight``) carries the layer's name through the exporter;
:func:`resolve_dynamic_weights` names the nodes and initializers after the layer and removes it.
"""

from __future__ import annotations

from typing import Any, Protocol

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from workbench.core.dynamic_quant import fake_quantize_dynamic
from workbench.engine.placement.layers import LayerWeights, QuantizedLayer, StandsIn
from workbench.engine.quantizers.modules import QUANTIZE
from workbench.runtime.per_call_specs import PerCallSpec
from workbench.runtime.qdq_ops import MARKER_DOMAIN

MARKER = "DynamicWeight"
ONNX_FLOAT = 1  # TensorProto.FLOAT


def is_dynamic_linear(layer: QuantizedLayer) -> bool:
    """Whether ``layer`` is a Linear whose input is quantized dynamically (quantizer on)."""
    quantizer = layer.input_quantizer
    return (
        isinstance(layer.layer, nn.Linear)
        and quantizer is not None
        and quantizer.dynamic
        and quantizer.mode == QUANTIZE
        and layer.weight_quantizer.enabled
    )


class _DynamicLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):
        return F.linear(fake_quantize_dynamic(x), spec.weight_dq, spec.bias)

    @staticmethod
    def symbolic(g, x, spec):
        x_q, x_scale, x_zero = g.op("DynamicQuantizeLinear", x, outputs=3)
        codes = g.op("Constant", value_t=spec.codes)
        codes = g.op(f"{MARKER_DOMAIN}::{MARKER}", codes, layer_s=spec.name)
        w_zero = g.op("Constant", value_t=spec.zero_point)
        integer = g.op("MatMulInteger", x_q, codes, x_zero, w_zero)
        values = g.op("Cast", integer, to_i=ONNX_FLOAT)
        scale = g.op("Mul", x_scale, g.op("Constant", value_t=spec.scale))
        y = g.op("Mul", values, scale)
        if spec.bias is not None:
            y = g.op("Add", y, g.op("Constant", value_t=spec.bias))
        return y


class ExportDynamicLinear(LayerWeights, PerCallSpec, StandsIn):
    """A Linear with a dynamic input quantizer (switched on), exported as the dynamic pattern
    above. ``spec`` is the layer's ``qdq_ops.LayerSpec``: codes stored as ``W^T``, FP32
    bias."""

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.spec.weight_dq, self.spec.bias  # the dequantized weight

    quantization_leaf = True

    def __init__(self, layer: QuantizedLayer, spec: Any) -> None:
        super().__init__()
        self.spec = spec
        self.layer_name = layer.layer_name
        self.__dict__["_stands_in_for"] = layer.layer  # read through, not a submodule

    def stands_in_for(self) -> nn.Module | None:
        return self.__dict__.get("_stands_in_for")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DynamicLinear.apply(x, self.call_spec())


# graph ---------------------------------------------------------------------------------------
class GraphEditor(Protocol):  # runtime.qdq_graph._Graph
    graph: onnx.GraphProto
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]

    def replace_uses(self, old: str, new: str) -> None: ...
    def remove(self, node: onnx.NodeProto) -> None: ...
    def rename_initializer(self, old: str, new: str) -> None: ...


def _layer_attribute(node: onnx.NodeProto) -> str:
    value = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "layer")
    return value.decode() if isinstance(value, bytes) else value


def _only_user(g: GraphEditor, tensor: str, op_type: str) -> onnx.NodeProto | None:
    users = g.consumers.get(tensor, [])
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def resolve_dynamic_weights(g: GraphEditor) -> list[tuple[str, str, str, str, str, int]]:
    """Name each dynamic Linear's nodes and initializers after its layer and drop the markers;
    returns ``(layer, op_type, node, weight initializer, output tensor, call)`` of each call
    (``op_type`` "MatMul", the op the layer is; ``node`` its MatMulInteger, ``layer#n`` for
    the n-th call of a layer called at several sites)."""
    rows = []
    calls: dict[str, int] = {}
    markers = [n for n in g.graph.node if n.domain == MARKER_DOMAIN and n.op_type == MARKER]
    for marker in markers:
        layer = _layer_attribute(marker)
        call = calls.get(layer, 0)
        calls[layer] = call + 1
        name = f"{layer}#{call}" if call else layer
        codes = marker.input[0]
        integer = _only_user(g, marker.output[0], "MatMulInteger")
        g.replace_uses(marker.output[0], codes)
        g.remove(marker)
        g.rename_initializer(codes, f"{name}.weight_quantized")
        if integer is None:
            continue
        integer.name = name
        g.rename_initializer(integer.input[3], f"{name}.weight_zero_point")
        quantize = g.producer.get(integer.input[0])
        if quantize is not None and quantize.op_type == "DynamicQuantizeLinear":
            quantize.name = f"{name}/input_quantize"
        output = integer.output[0]
        cast = _only_user(g, output, "Cast")
        multiply = _only_user(g, cast.output[0], "Mul") if cast is not None else None
        if multiply is not None:
            cast.name, multiply.name = f"{name}/cast", f"{name}/rescale"
            output = multiply.output[0]
            scales = g.producer.get(multiply.input[1])
            if scales is not None and scales.op_type == "Mul":
                scales.name = f"{name}/scales"
                g.rename_initializer(scales.input[1], f"{name}.weight_scale")
            bias = _only_user(g, output, "Add")
            if bias is not None:
                bias.name = f"{name}/bias_add"
                g.rename_initializer(bias.input[1], f"{name}.bias")
                output = bias.output[0]
        rows.append((layer, "MatMul", name, f"{name}.weight_quantized", output, call))
    return rows


def dynamic_linear_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the float nodes of each dynamic Linear (the scales' Mul, the rescaling Mul and
    the bias Add): parts of the layer that ONNX Runtime fuses with it, not ops of their own."""
    producer = {out: node for node in graph.node for out in node.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            users.setdefault(name, []).append(node)

    def only_user(tensor: str, op_type: str) -> onnx.NodeProto | None:
        found = users.get(tensor, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    names: set[str] = set()
    for integer in (n for n in graph.node if n.op_type == "MatMulInteger"):
        cast = only_user(integer.output[0], "Cast")
        rescale = only_user(cast.output[0], "Mul") if cast is not None else None
        if rescale is None:
            continue
        names.add(rescale.name)
        scales = producer.get(rescale.input[1])
        if scales is not None and scales.op_type == "Mul":
            names.add(scales.name)
        bias = only_user(rescale.output[0], "Add")
        if bias is not None:
            names.add(bias.name)
    return names
