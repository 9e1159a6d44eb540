"""Block-wise (``group_size``) weights as ONNX Runtime stores them: the packed codes, the
specs the export's stand-ins carry (``BlockwiseSpec`` for MatMulNBits, ``BlockwiseTableSpec``
for GatherBlockQuantized), and the arrays the large-model export writes one layer at a time.
The layout is described in ``blockwise_export``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from workbench.core.blockwise import expand_groups, group_count
from workbench.engine.placement.layers import QuantizedEmbedding, QuantizedLayer
from workbench.errors import ExportError


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
