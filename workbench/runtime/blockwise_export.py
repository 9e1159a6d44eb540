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

from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

from workbench.core.blockwise import expand_groups, group_count
from workbench.engine.placement.layers import QuantizedEmbedding, QuantizedLayer
from workbench.errors import ExportError

ORT_DOMAIN = "com.microsoft"
MARKER = "workbench::BlockwiseLinear"
TABLE_MARKER = "workbench::BlockwiseTable"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
DEFAULT_ACCURACY_LEVEL = 4


def stored_bits(bits: int) -> int:
    """The MatMulNBits width that holds ``bits``-bit codes: 2, 4 or 8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Unsigned codes ``[N, K]`` as MatMulNBits' ``B``: uint8 ``[N, k_blocks, blob]``."""
    rows, columns = codes.shape
    blocks = group_count(columns, block_size)
    padded = np.zeros((rows, blocks * block_size), np.uint8)
    padded[:, :columns] = codes
    per_byte = 8 // bits
    grouped = padded.reshape(rows, blocks, block_size // per_byte, per_byte).astype(np.uint16)
    shifts = (np.arange(per_byte, dtype=np.uint16) * bits).reshape(1, 1, 1, -1)
    return (grouped << shifts).sum(axis=3).astype(np.uint8)


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned zero points ``[N, k_blocks]`` packed along the blocks: ``[N, ceil(kb*b/8)]``."""
    rows, blocks = zero_points.shape
    per_byte = 8 // bits
    width = group_count(blocks, per_byte) * per_byte
    padded = np.zeros((rows, width), np.uint8)
    padded[:, :blocks] = zero_points
    grouped = padded.reshape(rows, width // per_byte, per_byte).astype(np.uint16)
    shifts = (np.arange(per_byte, dtype=np.uint16) * bits).reshape(1, 1, -1)
    return (grouped << shifts).sum(axis=2).astype(np.uint8)


@dataclass(eq=False)
class BlockwiseSpec:
    """One block-wise Linear as MatMulNBits stores it, and its simulated weight.

    A deferred spec (the large-model export, ``deferred_blockwise_spec``) holds one-element
    placeholders for ``packed`` / ``scales`` / ``zero_points`` and no ``weight_dq``: the trace
    runs on ``source``'s FP32 weight (``spec_weight``), and the stored arrays are computed
    (``blockwise_arrays``) when the file is written."""

    name: str
    weight_dq: torch.Tensor | None  # [out, in] float32: the weight the simulation uses
    bias: torch.Tensor | None
    packed: torch.Tensor  # uint8 [N, k_blocks, blob]
    scales: torch.Tensor  # float32 [N * k_blocks]
    zero_points: torch.Tensor | None  # uint8 packed, asymmetric schemes only
    in_features: int
    out_features: int
    bits: int  # the stored width: 2, 4 or 8
    block_size: int
    kind: str = "blockwise"
    source: QuantizedLayer | None = None  # deferred: the layer the weight is read from


def spec_weight(spec) -> torch.Tensor:
    """The simulated weight of a spec. A deferred spec only serves the trace, whose graph
    its ``symbolic`` writes: a zero of the weight's shape stands in (one element, expanded),
    so tracing a large model dequantizes and allocates nothing."""
    if spec.weight_dq is not None:
        return spec.weight_dq
    return torch.zeros(()).expand(spec.out_features, spec.in_features)


@dataclass(eq=False)
class BlockwiseTableSpec:
    """One block-wise embedding table as GatherBlockQuantized stores it."""

    name: str
    weight_dq: torch.Tensor  # [rows, dim] float32: the table the simulation uses
    packed: torch.Tensor  # uint8 [rows, dim * bits / 8]
    scales: torch.Tensor  # float32 [rows, groups]
    zero_points: torch.Tensor | None  # uint8 packed, asymmetric schemes only
    bits: int  # the stored width: 4 or 8
    block_size: int
    kind: str = "blockwise_embedding"


def _codes_and_qparams(layer: QuantizedLayer, with_weight: bool = True):
    """The integer codes behind the simulated weight, with its per-group qparams (and the
    simulated weight itself unless ``with_weight`` is False)."""
    scheme = layer.weight_quantizer.scheme
    with torch.no_grad():
        kept = layer.weight_quantizer.exact_codes(layer.layer.weight)
        if kept is not None:  # the codes the forward pass dequantizes: no rounding again
            codes = kept.codes()
            scale = kept.scale.detach().to(torch.float32)
            zero_point = kept.zero_point.detach().to(torch.int32)
            weight_dq = kept.dequantize() if with_weight else None
            return weight_dq, codes, scale, zero_point
        weight_dq = layer.quantized_weight().detach().to(torch.float32)
        scale, zero_point = layer.weight_quantizer.qparams(layer.layer.weight)
        scale = scale.detach().to(torch.float32)
        zero_point = zero_point.detach().to(torch.int32)
        columns, g = weight_dq.shape[1], scheme.group_size
        s = expand_groups(scale, columns, g)
        z = expand_groups(zero_point, columns, g).to(torch.float32)
        codes = torch.round(weight_dq / s) + z
        codes = codes.clamp(scheme.quant_min, scheme.quant_max).to(torch.int32)
    return weight_dq, codes, scale, zero_point


def _table_spec(layer: QuantizedEmbedding) -> BlockwiseTableSpec:
    scheme = layer.weight_quantizer.scheme
    weight_dq, codes, scale, zero_point = _codes_and_qparams(layer)
    bits = 4 if scheme.bits <= 4 else 8  # GatherBlockQuantized's widths
    offset = 2 ** (bits - 1) if scheme.symmetric else 0
    unsigned = (codes + offset).numpy().astype(np.uint8)
    packed = pack_codes(unsigned, bits, scheme.group_size).reshape(unsigned.shape[0], -1)
    zero_points = None
    if not scheme.symmetric:
        zero_points = torch.from_numpy(pack_zero_points(zero_point.numpy().astype(np.uint8), bits))
    return BlockwiseTableSpec(
        layer.layer_name,
        weight_dq,
        torch.from_numpy(packed),
        scale.clone(),
        zero_points,
        bits,
        scheme.group_size,
    )


def blockwise_spec(layer: QuantizedLayer) -> BlockwiseSpec | BlockwiseTableSpec | None:
    """The MatMulNBits form of a quantized Linear with a block-wise scheme (the
    GatherBlockQuantized form of a block-wise embedding table), else None."""
    module = layer.layer
    scheme = layer.weight_quantizer.scheme
    if scheme.group_size is None:
        return None
    if isinstance(layer, QuantizedEmbedding):
        return _table_spec(layer)
    if not isinstance(module, nn.Linear):
        raise ExportError(
            f"layer {layer.layer_name!r} ({type(module).__name__}) has a block-wise weight "
            "scheme, which only Linear layers export; give it a per-channel scheme"
        )
    return _linear_spec(layer, with_weight=True)


def _linear_spec(layer: QuantizedLayer, with_weight: bool) -> BlockwiseSpec:
    module = layer.layer
    scheme = layer.weight_quantizer.scheme
    weight_dq, codes, scale, zero_point = _codes_and_qparams(layer, with_weight)
    rows, columns = codes.shape
    g = scheme.group_size
    bits = stored_bits(scheme.bits)
    offset = 2 ** (bits - 1) if scheme.symmetric else 0  # MatMulNBits' default zero point
    unsigned = (codes + offset).numpy().astype(np.uint8)
    del codes
    zero_points = None
    if not scheme.symmetric:
        zero_points = torch.from_numpy(pack_zero_points(zero_point.numpy().astype(np.uint8), bits))
    bias = module.bias.detach().to(torch.float32).clone() if module.bias is not None else None
    return BlockwiseSpec(
        layer.layer_name,
        weight_dq,
        bias,
        torch.from_numpy(pack_codes(unsigned, bits, g)),
        scale.reshape(-1).clone(),
        zero_points,
        columns,
        rows,
        bits,
        g,
    )


def deferred_blockwise_spec(layer: QuantizedLayer) -> BlockwiseSpec | None:
    """The spec of a block-wise Linear with placeholders for its stored arrays (the large-model
    export writes them later, one layer at a time: ``blockwise_arrays``); None for layers that
    are not block-wise Linears."""
    module = layer.layer
    scheme = layer.weight_quantizer.scheme
    if scheme.group_size is None or isinstance(layer, QuantizedEmbedding):
        return None
    if not isinstance(module, nn.Linear):
        return blockwise_spec(layer)  # the error naming the layer
    bits = stored_bits(scheme.bits)
    bias = module.bias.detach().to(torch.float32).clone() if module.bias is not None else None
    return BlockwiseSpec(
        layer.layer_name,
        None,
        bias,
        torch.zeros(1, dtype=torch.uint8),
        torch.zeros(1, dtype=torch.float32),
        None if scheme.symmetric else torch.zeros(1, dtype=torch.uint8),
        module.in_features,
        module.out_features,
        bits,
        scheme.group_size,
        source=layer,
    )


def _kept_packed(layer: QuantizedLayer) -> dict[str, np.ndarray] | None:
    """MatMulNBits' arrays straight from the kept 4-bit codes, without unpacking them: two
    codes per byte, the first in the low bits, row after row, stored as ``q - q_min`` is
    MatMulNBits' ``B`` when each row is whole blocks and ``q_min`` is its offset (-8 for
    signed codes, 0 for unsigned ones with zero points)."""
    module = layer.layer
    kept = layer.weight_quantizer.exact_codes(module.weight)
    if kept is None:
        return None
    scheme = kept.scheme
    rows, columns = kept.shape
    block = scheme.group_size
    offset = -(2 ** (scheme.bits - 1)) if scheme.symmetric else 0
    if scheme.bits != 4 or columns % block or block % 2 or scheme.quant_min != offset:
        return None
    arrays = {
        "weight_quantized": kept.stored.numpy().reshape(rows, columns // block, block // 2),
        "weight_scale": kept.scale.detach().to(torch.float32).reshape(-1).numpy(),
    }
    if not scheme.symmetric:
        zero_points = kept.zero_point.numpy().astype(np.uint8)
        arrays["weight_zero_point"] = pack_zero_points(zero_points, 4)
    return arrays


def blockwise_arrays(layer: QuantizedLayer) -> dict[str, np.ndarray]:
    """The arrays MatMulNBits stores for a block-wise Linear, by initializer suffix."""
    packed = _kept_packed(layer)
    if packed is not None:
        return packed
    spec = _linear_spec(layer, with_weight=False)
    arrays = {"weight_quantized": spec.packed.numpy(), "weight_scale": spec.scales.numpy()}
    if spec.zero_points is not None:
        arrays["weight_zero_point"] = spec.zero_points.numpy()
    return arrays


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
