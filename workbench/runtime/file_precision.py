"""What an ONNX file computes in, read from its nodes: the name ``wb.benchmark`` gives it.

``MatMulNBits`` / ``GatherBlockQuantized`` nodes hold packed 2/4/8-bit weights (activations
stay float: "int4 weights"); ``QuantizeLinear`` / ``DequantizeLinear`` / ``QLinear*`` /
``*Integer`` nodes are the INT8 QDQ path; a file with both is mixed; neither, FP32.
"""

from __future__ import annotations

import os

import onnx

BLOCKWISE_OPS = ("MatMulNBits", "GatherBlockQuantized")
INT8_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "MatMulIntegerToFloat",
)


def file_precision(path: str | os.PathLike) -> str:
    """``"int4 weights"``, ``"INT8"``, ``"mixed: int4 weights + INT8"`` or ``"FP32"``."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weight_bits: set[int] = set()
    int8 = False
    for node in graph.node:
        if node.op_type in BLOCKWISE_OPS:
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            weight_bits.add(int(bits))
        elif node.op_type in INT8_OPS:
            int8 = True
    if not weight_bits:
        return "INT8" if int8 else "FP32"
    weights = "/".join(f"int{b}" for b in sorted(weight_bits)) + " weights"
    return f"mixed: {weights} + INT8" if int8 else weights
