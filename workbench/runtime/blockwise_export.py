"""Export of block-wise (``group_size``) Linear weights as ONNX Runtime's ``MatMulNBits``.

A Linear whose weight scheme is block-wise becomes one ``com.microsoft::MatMulNBits`` node
(``-> Add`` for the bias), and a block-wise embedding table one ``GatherBlockQuantized`` node
(4 or 8 bits, the same packing along each row), whose weight is stored packed, as ONNX
Runtime's 2/4/8-bit kernels read it:

* ``B``: uint8 ``[N, k_blocks, block_size * bits / 8]``: for output channel ``n`` and block
  ``b`` the unsigned codes of inputs ``b*g .. b*g+g-1``, ``8 / bits`` per byte, the first in
  the low bits (the last block zero-padded);
* ``scales``: float32 ``[N * k_blocks]``;
* ``zero_points`` (asymmetric schemes): uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed the
  same way; symmetric schemes leave it out and ONNX Runtime uses ``2^(bits-1)``, so a signed
  code ``q`` is stored as ``q + 2^(bits-1)``.

Why MatMulNBits directly rather than an opset-21 ``DequantizeLinear(block_size) -> MatMul``
that ONNX Runtime can fuse into the same kernel: the TorchScript exporter stops at opset 20,
ONNX has no 2-bit type before opset 25, the node's ``accuracy_level`` (4 = int8 compute, ONNX
Runtime's fastest on x86; 1 = FP32 compute) is then a property of the file the user chooses at
export, and nothing depends on the fusion matching: measured here (ONNX Runtime 1.32, default
session), six ``DequantizeLinear(INT4 [1024, 1024], block_size 32) -> MatMul`` layers written
with ``onnx.helper`` stayed unfused (DequantizeLinear in the optimized graph) and ran a
one-token input 20-40x slower than the same layers as MatMulNBits. 3-bit codes are stored in 4-bit
blocks and 5..7-bit codes in 8-bit blocks (same values; MatMulNBits has no 3/5/6/7-bit
layout): such files are larger than the storage table's packed count.
"""

from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F
from onnx import helper

from workbench.errors import ExportError
from workbench.runtime.blockwise_specs import BlockwiseSpec, BlockwiseTableSpec

ORT_DOMAIN = "com.microsoft"
MARKER = "workbench::BlockwiseLinear"
TABLE_MARKER = "workbench::BlockwiseTable"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
DEFAULT_ACCURACY_LEVEL = 4


class BlockwiseLinear(torch.autograd.Function):
    """``F.linear`` with the simulated weight; exported as MatMulNBits (-> Add bias)."""

    @staticmethod
    def forward(ctx, x, spec: BlockwiseSpec):
        if spec.weight_dq is None:  # deferred: only the trace runs this, zeros of the shape
            out = x.new_zeros((*x.shape[:-1], spec.out_features))
            return out if spec.bias is None else out + spec.bias
        return F.linear(x, spec.weight_dq, spec.bias)

    @staticmethod
    def symbolic(g, x, spec: BlockwiseSpec):
        inputs = [
            x,
            g.op("Constant", value_t=spec.packed),
            g.op("Constant", value_t=spec.scales),
        ]
        if spec.zero_points is not None:
            inputs.append(g.op("Constant", value_t=spec.zero_points))
        y = g.op(
            f"{ORT_DOMAIN}::MatMulNBits",
            *inputs,
            K_i=spec.in_features,
            N_i=spec.out_features,
            bits_i=spec.bits,
            block_size_i=spec.block_size,
            accuracy_level_i=DEFAULT_ACCURACY_LEVEL,
        )
        y = g.op(MARKER, y, layer_s=spec.name)
        if spec.bias is not None:
            y = g.op("Add", y, g.op("Constant", value_t=spec.bias))
        return y


class BlockwiseEmbedding(torch.autograd.Function):
    """``F.embedding`` of the simulated table; exported as GatherBlockQuantized."""

    @staticmethod
    def forward(ctx, ids, spec: BlockwiseTableSpec):
        return F.embedding(ids, spec.weight_dq)

    @staticmethod
    def symbolic(g, ids, spec: BlockwiseTableSpec):
        inputs = [
            g.op("Constant", value_t=spec.packed),
            ids,
            g.op("Constant", value_t=spec.scales),
        ]
        if spec.zero_points is not None:
            inputs.append(g.op("Constant", value_t=spec.zero_points))
        rows = g.op(
            f"{ORT_DOMAIN}::GatherBlockQuantized",
            *inputs,
            bits_i=spec.bits,
            block_size_i=spec.block_size,
            gather_axis_i=0,
            quantize_axis_i=1,
        )
        return g.op(TABLE_MARKER, rows, layer_s=spec.name)


def check_accuracy_level(accuracy_level: int) -> None:
    if isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(
            f"accuracy_level must be one of {ACCURACY_LEVELS} (MatMulNBits: 0 unset, 1 fp32, "
            f"2 fp16, 3 bf16, 4 int8 compute), got {accuracy_level!r}; the default 4 is "
            "ONNX Runtime's fastest on x86"
        )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def resolve_blockwise_layers(
    graph: onnx.GraphProto, accuracy_level: int = DEFAULT_ACCURACY_LEVEL
) -> list[dict]:
    """Name each MatMulNBits node and its initializers after its layer, set its
    ``accuracy_level`` and drop the marker nodes; returns one row per layer (first call) for
    the graph's layer map (``graph_info.QuantizedLayerInfo`` fields)."""
    check_accuracy_level(accuracy_level)
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    _resolve_tables(graph, producer, initializers)
    markers = [n for n in graph.node if f"{n.domain}::{n.op_type}" == MARKER]
    rows: list[dict] = []
    calls: dict[str, int] = {}
    for marker in markers:
        layer = _text(next(a for a in marker.attribute if a.name == "layer").s)
        call = calls.get(layer, 0)
        calls[layer] = call + 1
        name = f"{layer}#{call}" if call else layer
        node = producer[marker.input[0]]
        node.name = name
        node.output[0] = marker.output[0]  # the marker is MatMulNBits' only reader
        for attribute in node.attribute:
            if attribute.name == "accuracy_level":
                attribute.i = accuracy_level
        _rename_inputs(node, name, initializers, (1, 2, 3))
        output = node.output[0]
        users = [n for n in graph.node if output in n.input]
        if len(users) == 1 and users[0].op_type == "Add":
            users[0].name = f"{name}/bias_add"
            output = users[0].output[0]
            bias = users[0].input[1]
            if bias in initializers and f"{name}.bias" not in initializers:
                initializers[bias].name = f"{name}.bias"
                initializers[f"{name}.bias"] = initializers.pop(bias)
                users[0].input[1] = f"{name}.bias"
        if not call:
            rows.append(
                {
                    "name": layer,
                    "op_type": "MatMulNBits",
                    "node": name,
                    "weight": node.input[1],
                    "output": output,
                }
            )
    for marker in markers:
        graph.node.remove(marker)
    return rows


def _rename_inputs(node, name: str, initializers: dict, positions: tuple[int, ...]) -> None:
    suffixes = ("weight_quantized", "weight_scale", "weight_zero_point")
    for index, suffix in zip(positions, suffixes, strict=False):
        if index >= len(node.input):
            continue
        old, new = node.input[index], f"{name}.{suffix}"
        if old in initializers and new not in initializers:
            initializers[old].name = new
            initializers[new] = initializers.pop(old)
            node.input[index] = new


def _resolve_tables(graph: onnx.GraphProto, producer: dict, initializers: dict) -> None:
    """Name each GatherBlockQuantized node and its initializers after its table; drop the
    marker nodes (a table called twice keeps one initializer per call, named ``#1``...)."""
    calls: dict[str, int] = {}
    for marker in [n for n in graph.node if f"{n.domain}::{n.op_type}" == TABLE_MARKER]:
        layer = _text(next(a for a in marker.attribute if a.name == "layer").s)
        call = calls.get(layer, 0)
        calls[layer] = call + 1
        name = f"{layer}#{call}" if call else layer
        node = producer[marker.input[0]]
        node.name = f"{name}/gather"
        node.output[0] = marker.output[0]
        _rename_inputs(node, name, initializers, (0, 2, 3))
        graph.node.remove(marker)


def ensure_ort_domain(model: onnx.ModelProto) -> None:
    """Declare the ``com.microsoft`` domain (version 1) when a MatMulNBits node uses it."""
    used = any(node.domain == ORT_DOMAIN for node in model.graph.node)
    declared = any(op.domain == ORT_DOMAIN for op in model.opset_import)
    if used and not declared:
        model.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
