"""What a quantized model stores, layer by layer (the tutorial's byte accounting).

* weights: 1 byte per INT8 value, b/8 bytes per value when b < 8 (packed);
* scales: 4 bytes each (FP32), one per tensor, one per channel, or one per group of
  ``group_size`` inputs of each output channel (block-wise);
* zero points: only for asymmetric schemes, 1 byte each (block-wise: packed at b bits each,
  as ONNX Runtime's MatMulNBits stores them);
* bias: 4 bytes each. Where the layer's input is quantized the bias is rounded to the INT32
  grid of ``s_input * s_weight`` and the export stores those INT32 codes (Conv, and Linear as
  Gemm); a weight-only layer keeps it FP32. The tutorial counts it FP32: the bytes are the same.
Layers kept in FP32 store 4 bytes per parameter.

``onnx_bytes`` is what the INT8 ONNX export stores for the layer (``onnx_code_bytes``): the
same as ``total_bytes`` for block-wise (``group_size``) weights, which are stored packed; for
other weights below 8 bits more, since those are stored as one int8 code per value. An INT32
bias adds its FP32 scale and INT32 zero point per channel (counted for every layer with a
quantized input; a Linear on 3-D input keeps an FP32 bias and stores 8 bytes per output less).

For nn.Linear(10, 5): FP32 220 B; symmetric per-tensor 74 B; asymmetric per-tensor 75 B;
symmetric per-channel 90 B; asymmetric per-channel 95 B.
"""

from __future__ import annotations

import pandas as pd
from torch import nn

from workbench.core.blockwise import group_count
from workbench.core.qtensor import zero_point_bytes as zero_point_storage
from workbench.engine.capture.modules import get_layer
from workbench.engine.placement.layers import QuantizedLayer

STORAGE_COLUMNS = [
    "layer",
    "type",
    "status",
    "fp32_bytes",
    "weight_bytes",
    "scale_bytes",
    "zero_point_bytes",
    "bias_bytes",
    "total_bytes",
    "onnx_bytes",
]

FP32_BYTES = 4
BIAS_BYTES = 4  # INT32 codes or FP32 values (weight-only layers): 4 bytes either way


def packed_bytes(values: int, bits: int) -> int:
    """Bytes for ``values`` integers of ``bits`` bits each, packed."""
    return -(-values * bits // 8)


def quantized_layer_storage(layer: QuantizedLayer) -> dict[str, int]:
    """Bytes of one quantized Linear / Conv."""
    scheme = layer.weight_quantizer.scheme
    weight = layer.layer.weight
    bias = layer.layer.bias
    num_scales = weight.shape[scheme.axis % weight.dim()] if scheme.per_channel else 1
    if scheme.group_size is not None and weight.dim() == 2:
        num_scales = weight.shape[0] * group_count(weight.shape[1], scheme.group_size)
    weight_bytes = packed_bytes(weight.numel(), scheme.bits)
    scale_bytes = FP32_BYTES * num_scales
    zero_point_bytes = zero_point_storage(num_scales, scheme)
    bias_bytes = BIAS_BYTES * bias.numel() if bias is not None else 0
    # an INT32 bias is dequantized with its own FP32 scale and INT32 zero point per channel
    int32_bias = bias is not None and layer.input_quantizer is not None
    int32_bias = int32_bias and scheme.group_size is None and not layer.input_quantizer.dynamic
    bias_grid = 2 * BIAS_BYTES * bias.numel() if int32_bias else 0
    return {
        "weight_bytes": weight_bytes,
        "scale_bytes": scale_bytes,
        "zero_point_bytes": zero_point_bytes,
        "bias_bytes": bias_bytes,
        "total_bytes": weight_bytes + scale_bytes + zero_point_bytes + bias_bytes,
        "onnx_bytes": onnx_code_bytes(weight, scheme) + scale_bytes + bias_bytes + bias_grid,
    }


def onnx_code_bytes(weight, scheme) -> int:
    """Bytes the INT8 ONNX export stores for a weight's codes and zero points.

    Block-wise weights are packed at 2, 4 or 8 bits (3-bit codes in 4-bit blocks, 5..7-bit in
    8-bit ones; each row's last block padded whole), with packed zero points when asymmetric.
    Every other quantized weight is stored as int8 / uint8 codes, one byte each whatever its
    width (ONNX Runtime's integer conv and matmul kernels read 8-bit codes), with one zero
    point byte per scale (DequantizeLinear's zero point input, also when symmetric).
    """
    if scheme.group_size is not None and weight.dim() == 2:
        bits = 2 if scheme.bits <= 2 else 4 if scheme.bits <= 4 else 8
        rows, blocks = weight.shape[0], group_count(weight.shape[1], scheme.group_size)
        codes = rows * blocks * scheme.group_size * bits // 8
        zero_points = 0 if scheme.symmetric else rows * packed_bytes(blocks, bits)
        return codes + zero_points
    scales = weight.shape[scheme.axis % weight.dim()] if scheme.per_channel else 1
    return weight.numel() + scales


def fp32_module_storage(module: nn.Module, counted: set[int] | None = None) -> dict[str, int]:
    """Bytes of a module's own parameters kept in FP32 (bias counted apart). A parameter
    whose id is in ``counted`` is already stored by another layer (tied embedding and head
    weights) and adds nothing; the ids counted here are added to it."""
    bias_numel = 0
    weight_numel = 0
    for name, param in module.named_parameters(recurse=False):
        if counted is not None:
            if id(param) in counted:
                continue
            counted.add(id(param))
        if name == "bias":
            bias_numel += param.numel()
        else:
            weight_numel += param.numel()
    return {
        "weight_bytes": FP32_BYTES * weight_numel,
        "scale_bytes": 0,
        "zero_point_bytes": 0,
        "bias_bytes": FP32_BYTES * bias_numel,
        "total_bytes": FP32_BYTES * (weight_numel + bias_numel),
        "onnx_bytes": FP32_BYTES * (weight_numel + bias_numel),
    }


def storage_table(
    original_model: nn.Module, quantized_model: nn.Module, plans: list
) -> pd.DataFrame:
    """One row per parameter-holding layer of the original model, and a TOTAL row."""
    rows = []
    counted_fp32: set[int] = set()  # tied parameters are stored once
    counted_kept: set[int] = set()
    for plan in plans:
        name = plan.name
        original = get_layer(original_model, name)
        current = get_layer(quantized_model, name)
        fp32_bytes = fp32_module_storage(original, counted_fp32)["total_bytes"]
        if isinstance(current, QuantizedLayer):
            sizes = quantized_layer_storage(current)
        elif plan.folded_into is not None:
            sizes = dict.fromkeys(STORAGE_COLUMNS[4:], 0)
        else:
            sizes = fp32_module_storage(current, counted_kept)
        rows.append(
            {
                "layer": name,
                "type": plan.layer_type,
                "status": plan.status,
                "fp32_bytes": fp32_bytes,
            }
            | sizes
        )
    table = pd.DataFrame(rows, columns=STORAGE_COLUMNS)
    totals = {column: int(table[column].sum()) for column in STORAGE_COLUMNS[3:]}
    total_row = {"layer": "TOTAL", "type": "", "status": ""} | totals
    table = pd.concat([table, pd.DataFrame([total_row])], ignore_index=True)
    for column in STORAGE_COLUMNS[3:]:
        table[column] = table[column].astype("int64")
    return table
