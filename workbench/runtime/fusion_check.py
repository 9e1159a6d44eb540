"""Did ONNX Runtime turn every quantized layer into an integer kernel?

ONNX Runtime runs INT8 only where its QDQ fusion matches a pattern; an unmatched
``DequantizeLinear -> MatMul`` runs in FP32 *plus* the dequantization, slower than the FP32
model. So we ask ONNX Runtime itself: the session saves the graph it will run
(``SessionOptions.optimized_model_filepath``), and a quantized layer counts as fused when its
int8 weight initializer feeds an integer kernel there (QLinearConv, QGemm,
MatMulIntegerToFloat, ...). Every layer that did not fuse is listed with the likely reason.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import pandas as pd

from workbench.runtime.ort_session import load_onnx_model, make_session
from workbench.runtime.qdq_graph import QuantizedLayerInfo, read_graph_info

INTEGER_KERNELS = {
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "ConvInteger",
    "QLinearAdd",
    "QLinearMul",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearSoftmax",
    "QAttention",
    "MatMulNBits",
}
FLOAT_COMPUTE = {"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "NchwcConv"}
REPORT_TITLE = "ONNX Runtime fusion"


@dataclass
class FusionResult:
    """Which quantized layers run on integer kernels in ONNX Runtime.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per quantized layer: ``layer``, ``op_type``, ``fused``, ``kernel`` (the integer
        kernel it became), ``reason`` (why it did not fuse).
    kernels : pandas.DataFrame
        Node counts per op type in the optimized graph: integer kernels and FP32 compute.
    """

    table: pd.DataFrame
    kernels: pd.DataFrame

    @property
    def unfused(self) -> list[str]:
        return list(self.table.loc[~self.table["fused"].astype(bool), "layer"])

    @property
    def all_fused(self) -> bool:
        return not self.unfused

    def summary_text(self) -> str:
        total = len(self.table)
        text = f"{total - len(self.unfused)} of {total} quantized layers run on integer kernels"
        if self.unfused:
            text += f"; not fused: {', '.join(self.unfused)}"
        return text

    def __repr__(self) -> str:
        return f"{self.summary_text()}\n{self.table.to_string(index=False)}"


def _unfused_reason(graph: onnx.GraphProto, layer: QuantizedLayerInfo) -> str:
    """The likely reason, read from the exported (unoptimized) graph."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    node = next((n for n in graph.node if n.name == layer.node), None)
    if node is None:
        return "layer not found in the exported graph"
    source = producer.get(node.input[0])
    if source is None or source.op_type != "DequantizeLinear":
        return "input is not quantized (weight-only or FP32 activations): no integer kernel"
    if node.op_type == "Conv":
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):
            users = consumers.get(users[0].output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear":
            return "Conv output is not quantized (QLinearConv needs DQ -> Conv -> Q)"
    types = {init.name: init.data_type for init in graph.initializer}
    if source.input[0] in types and types[source.input[0]] not in (2, 3):
        return "activation is not 8-bit"
    return "ONNX Runtime did not match the QDQ pattern (check the activation / weight dtypes)"


def check_fusion(
    path: str | os.PathLike, threads: int | None = 1, warn: bool = True
) -> FusionResult:
    """Count the integer kernels in the graph ONNX Runtime runs, against the quantized layers.

    ``path`` must be a model written by ``export_onnx`` (its metadata lists the quantized
    layers). With ``warn``, every layer that did not fuse is named in a warning.
    """
    exported = load_onnx_model(path)
    layers = read_graph_info(exported).layers
    with tempfile.TemporaryDirectory(prefix="workbench-fusion-") as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        make_session(path, threads, optimized_path=optimized_path)
        optimized = onnx.load(str(optimized_path))
    kernel_of_input: dict[str, str] = {}
    kernel_of_name: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for node in optimized.graph.node:
        if node.op_type in INTEGER_KERNELS:
            counts[node.op_type] += 1
            for name in node.input:
                kernel_of_input.setdefault(name, node.op_type)
            kernel_of_name[node.name] = node.op_type
        elif node.op_type in FLOAT_COMPUTE:
            counts[f"{node.op_type} (FP32)"] += 1
    rows = []
    for layer in layers:
        kernel = kernel_of_input.get(layer.weight) or next(
            (op for name, op in kernel_of_name.items() if name.split("_token")[0] == layer.node),
            None,
        )
        rows.append(
            {
                "layer": layer.name,
                "op_type": layer.op_type,
                "fused": kernel is not None,
                "kernel": kernel or "",
                "reason": "" if kernel else _unfused_reason(exported.graph, layer),
            }
        )
    table = pd.DataFrame(rows, columns=["layer", "op_type", "fused", "kernel", "reason"])
    kernels = pd.DataFrame(sorted(counts.items()), columns=["op_type", "count"]).reset_index(
        drop=True
    )
    result = FusionResult(table, kernels)
    if warn and result.unfused:
        warnings.warn(
            f"{len(result.unfused)} of {len(table)} quantized layers did not fuse into ONNX "
            f"Runtime integer kernels ({', '.join(result.unfused)}); they run in FP32 plus the "
            "Q/DQ work, which is slower than FP32 — see the fusion table for the reasons",
            stacklevel=2,
        )
    return result
