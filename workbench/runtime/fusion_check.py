"""Did ONNX Runtime turn every quantized layer into an integer kernel?

ONNX Runtime runs INT8 only where its QDQ fusion matches a pattern; an unmatched
``DequantizeLinear -> MatMul`` runs in FP32 *plus* the dequantization, slower than the FP32
model. So we ask ONNX Runtime itself: the session saves the graph it will run
(``SessionOptions.optimized_model_filepath``), and a quantized layer counts as fused when its
int8 weight initializer feeds an integer kernel there (QLinearConv, QGemm,
MatMulIntegerToFloat, ...). Every layer that did not fuse is listed with the likely reason.

Residual adds, concats and pools are listed too (``FusionResult.ops``): each with the integer
kernel ONNX Runtime made of it (QLinearAdd, QLinearConcat, QLinear(Global)AveragePool, MaxPool
on uint8), or the reason it runs in FP32 (read from the exported graph: which input is not
quantized, or that its output is not).
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

from workbench.runtime.dynamic_export import dynamic_linear_nodes
from workbench.runtime.graph_info import QuantizedLayerInfo, read_graph_info
from workbench.runtime.onnx_maps import TensorMap, tensor_map
from workbench.runtime.ort_session import load_onnx_model, make_session

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
OPS_REPORT_TITLE = "ONNX Runtime fusion of adds, concats and pools"
SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Constant", "Cast", "Slice", "Concat"}
# exported op type -> the op kind it is (engine.placement.op_kinds) and the integer kernel it can
# become
LISTED_OPS = {
    "Add": ("add", "QLinearAdd"),
    "Concat": ("concat", "QLinearConcat"),
    "Mul": ("mul", "QLinearMul"),
    "AveragePool": ("average pool", "QLinearAveragePool"),
    "GlobalAveragePool": ("average pool", "QLinearGlobalAveragePool"),
    "MaxPool": ("max pool", "MaxPool (uint8)"),
    "MatMul": ("matmul", "MatMulIntegerToFloat"),  # activation x activation (attention) only
}


class Reason(str):
    """Why a layer or op did not fuse: the text people read, and ``code``, the fact code
    reads (one of :data:`REASON_CODES`); tests and tools compare codes, never the words."""

    code: str  # "" for no reason (fused)

    def __new__(cls, code: str, text: str) -> Reason:
        if code not in REASON_CODES and (code or text):
            raise ValueError(f"unknown fusion reason code {code!r}")
        reason = super().__new__(cls, text)
        reason.code = code
        return reason

    def __getnewargs__(self) -> tuple[str, str]:
        return self.code, str(self)


REASON_CODES = (
    "not_in_graph",  # the layer's node is not in the exported graph
    "input_not_quantized",  # an input comes from an FP32 producer (no DequantizeLinear)
    "output_not_quantized",  # no QuantizeLinear after it (QLinear kernels need DQ -> op -> Q)
    "activation_not_8bit",  # the activation's codes are not int8 / uint8
    "pattern_not_matched",  # quantized around, yet ONNX Runtime did not fuse it
    "dynamic_not_matched",  # the dynamic pattern is there, ONNX Runtime did not fuse it
    "dynamic_pattern_broken",  # DynamicQuantizeLinear -> MatMulInteger not followed by Cast -> Mul
)


def source_node(optimized_name: str) -> str:
    """The exported node an optimized-graph node was made from. ONNX Runtime's graph
    transformers name a node they create ``<source node>_token_<n>``
    (``Graph::GenerateNodeName``) and keep no other link to the source, so the name is all
    there is to read."""
    return optimized_name.split("_token_")[0]


@dataclass
class FusionResult:
    """Which quantized layers run on integer kernels in ONNX Runtime.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per quantized layer: ``layer``, ``op_type``, ``fused``, ``kernel`` (the integer
        kernel it became), ``reason`` (why it did not fuse) and ``reason_code`` (the same as a
        code of :data:`REASON_CODES`; "" when fused).
    kernels : pandas.DataFrame
        Node counts per op type in the optimized graph: integer kernels and FP32 compute.
    """

    table: pd.DataFrame
    kernels: pd.DataFrame
    ops: pd.DataFrame | None = None

    @property
    def unfused(self) -> list[str]:
        return list(self.table.loc[~self.table["fused"].astype(bool), "layer"])

    @property
    def unfused_ops(self) -> list[str]:
        """Adds / concats / pools exported quantized that still run in FP32."""
        if self.ops is None or self.ops.empty:
            return []
        stuck = self.ops["quantized"].astype(bool) & ~self.ops["fused"].astype(bool)
        return list(self.ops.loc[stuck, "op"])

    @property
    def all_fused(self) -> bool:
        return not self.unfused and not self.unfused_ops

    def summary_text(self) -> str:
        total = len(self.table)
        text = f"{total - len(self.unfused)} of {total} quantized layers run on integer kernels"
        if self.unfused:
            text += f"; not fused: {', '.join(self.unfused)}"
        if self.ops is not None and not self.ops.empty:
            for kind in dict.fromkeys(self.ops["kind"]):
                rows = self.ops[self.ops["kind"] == kind]
                text += f"; {int(rows['fused'].sum())} of {len(rows)} {kind}s on integer kernels"
        return text

    def __repr__(self) -> str:
        text = f"{self.summary_text()}\n{self.table.to_string(index=False)}"
        if self.ops is not None and not self.ops.empty:
            text += f"\n{self.ops.to_string(index=False)}"
        return text


def _unfused_reason(graph: onnx.GraphProto, layer: QuantizedLayerInfo) -> str:
    """The likely reason, read from the exported (unoptimized) graph."""
    tensors = tensor_map(graph)
    producer, consumers = tensors.producer, tensors.consumers
    node = next((n for n in graph.node if n.name == layer.node), None)
    if node is None:
        return Reason("not_in_graph", "layer not found in the exported graph")
    source = producer.get(node.input[0])
    if source is not None and source.op_type == "DynamicQuantizeLinear":
        return _dynamic_reason(node, consumers)
    if source is None or source.op_type != "DequantizeLinear":
        return Reason(
            "input_not_quantized",
            "input is not quantized (weight-only or FP32 activations): no integer kernel",
        )
    if node.op_type == "Conv":
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):
            users = consumers.get(users[0].output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear":
            return Reason(
                "output_not_quantized",
                "Conv output is not quantized (QLinearConv needs DQ -> Conv -> Q)",
            )
    types = {init.name: init.data_type for init in graph.initializer}
    if source.input[0] in types and types[source.input[0]] not in (2, 3):
        return Reason("activation_not_8bit", "activation is not 8-bit")
    return Reason(
        "pattern_not_matched",
        "ONNX Runtime did not match the QDQ pattern (check the activation / weight dtypes)",
    )


def _dynamic_reason(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    """Why a dynamic Linear (``DynamicQuantizeLinear -> MatMulInteger``) did not fuse."""
    pattern = "DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul"
    users = consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Cast":
        users = consumers.get(users[0].output[0], [])
        if len(users) == 1 and users[0].op_type == "Mul":
            return Reason(
                "dynamic_not_matched",
                f"ONNX Runtime did not fuse the dynamic pattern {pattern} into "
                "DynamicQuantizeMatMul / MatMulIntegerToFloat (check the weight is an int8 "
                "initializer and the scales are constants)",
            )
    return Reason(
        "dynamic_pattern_broken",
        f"dynamic pattern broken: {node.op_type} after DynamicQuantizeLinear is not followed "
        f"by Cast -> Mul (ONNX Runtime fuses only {pattern})",
    )


def _float_reason(node: onnx.NodeProto, tensors: TensorMap, code_inputs: set[str]) -> str:
    """Why an add / concat / pool of the exported graph is not in its quantized form."""
    for name in node.input[:1] if node.op_type != "Concat" else node.input:
        source = tensors.producer.get(name)
        if name in code_inputs or (source is not None and source.op_type == "DequantizeLinear"):
            continue
        if node.op_type == "MaxPool":
            return Reason(
                "input_not_quantized", "input is FP32 (no quantizer before it): runs in FP32"
            )
        what = source.op_type if source is not None else "a graph input"
        return Reason(
            "input_not_quantized",
            f"input from {what} is not quantized (FP32 producer): runs in FP32",
        )
    if node.op_type == "Add":
        other = node.input[1] if len(node.input) > 1 else ""
        source = tensors.producer.get(other)
        if source is None or source.op_type != "DequantizeLinear":
            what = source.op_type if source is not None else "a constant or graph input"
            return Reason(
                "input_not_quantized",
                f"input from {what} is not quantized (FP32 producer): runs in FP32",
            )
    return Reason(
        "output_not_quantized", "output is not quantized (no QuantizeLinear after it): runs in FP32"
    )


def _op_label(node: onnx.NodeProto) -> str:
    """``layer1.0/Add`` from the exporter's ``/model/layer1/layer1.0/Add`` (scopes that only
    repeat the next one's prefix are dropped)."""
    parts = [p for p in node.name.split("/") if p and p != "model"]
    kept = [p for i, p in enumerate(parts) if i + 1 >= len(parts) or not parts[i + 1].startswith(p)]
    return "/".join(kept) or node.output[0]


def _op_rows(exported: onnx.ModelProto, optimized: onnx.ModelProto) -> pd.DataFrame:
    """One row per add / concat / pool of the exported graph: its kernel or the reason."""
    graph = exported.graph
    tensors = tensor_map(graph)
    sites = {tensor: site for site, tensor in read_graph_info(exported).sites.items()}
    kernel_of_name = {node.name: node.op_type for node in optimized.graph.node}
    code_inputs = {
        node.output[0] for node in graph.node if node.op_type == "QuantizeLinear"
    }  # uint8 / int8 tensors
    rows = []
    initializers = {init.name for init in graph.initializer}

    def reads_weight(name: str) -> bool:
        source = tensors.producer.get(name)
        if source is not None and source.op_type == "DequantizeLinear":
            name = source.input[0]
        return name in initializers

    def shape_arithmetic(name: str) -> bool:
        source = tensors.producer.get(name)
        return name in initializers or (source is not None and source.op_type in SHAPE_OPS)

    inside_layers = dynamic_linear_nodes(graph)  # fused with their dynamic Linear
    for node in graph.node:
        if node.op_type not in LISTED_OPS or node.name in inside_layers:
            continue
        if node.op_type == "Concat" and all(shape_arithmetic(name) for name in node.input):
            continue  # builds a shape (``x.view(x.shape[0], -1)``), not a tensor of values
        if node.op_type == "MatMul" and any(reads_weight(name) for name in node.input):
            continue  # a Linear: listed in the layer table
        kind, kernel = LISTED_OPS[node.op_type]
        users = tensors.users(node.output[0])
        if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):
            users = tensors.users(users[0].output[0])
        quantize = users[0] if len(users) == 1 and users[0].op_type == "QuantizeLinear" else None
        label = _op_label(node)
        if node.op_type == "MaxPool":
            on_codes = node.input[0] in code_inputs
            quantized = fused = on_codes
        else:
            inputs = node.input if node.op_type == "Concat" else node.input[:2]
            quantized = (quantize is not None or node.op_type == "MatMul") and all(
                getattr(tensors.producer.get(name), "op_type", "") == "DequantizeLinear"
                for name in inputs
            )
            made = kernel_of_name.get(node.name, "")
            fused = made.startswith("QLinear") or (
                node.op_type == "MatMul" and made in INTEGER_KERNELS
            )
            if node.op_type == "MatMul" and fused:
                kernel = made
        reason = Reason("", "") if fused else _float_reason(node, tensors, code_inputs)
        if quantized and not fused:
            reason = Reason("pattern_not_matched", "ONNX Runtime did not match the QDQ pattern")
        rows.append(
            {
                "op": label,
                "site": sites.get(quantize.output[0], "") if quantize is not None else "",
                "kind": kind,
                "op_type": node.op_type,
                "quantized": quantized,
                "fused": fused,
                "kernel": kernel if fused else "",
                "reason": str(reason),
                "reason_code": reason.code,
            }
        )
    columns = ["op", "site", "kind", "op_type", "quantized", "fused", "kernel", "reason"]
    columns.append("reason_code")
    return pd.DataFrame(rows, columns=columns)


def check_fusion(
    path: str | os.PathLike, threads: int | None = 1, warn: bool = True
) -> FusionResult:
    """Count the integer kernels in the graph ONNX Runtime runs, against the quantized layers.

    ``path`` must be a model written by ``export_onnx`` (its metadata lists the quantized
    layers). With ``warn``, every layer that did not fuse is named in a warning.
    """
    exported = load_onnx_model(path, with_weights=False)
    layers = read_graph_info(exported).layers
    with tempfile.TemporaryDirectory(prefix="workbench-fusion-") as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        session = make_session(path, threads, optimized_path=optimized_path)
        del session  # its weights: only the graph it saved is read
        optimized = onnx.load(str(optimized_path), load_external_data=False)
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
        by_node = kernel_of_name.get(layer.node) or next(
            (op for name, op in kernel_of_name.items() if source_node(name) == layer.node),
            None,
        )
        # the calls of a layer called at several sites share its weight: find each by its node
        kernel = by_node if layer.call else kernel_of_input.get(layer.weight) or by_node
        reason = Reason("", "") if kernel else _unfused_reason(exported.graph, layer)
        rows.append(
            {
                "layer": layer.node if layer.call else layer.name,
                "op_type": layer.op_type,
                "fused": kernel is not None,
                "kernel": kernel or "",
                "reason": str(reason),
                "reason_code": reason.code,
            }
        )
    columns = ["layer", "op_type", "fused", "kernel", "reason", "reason_code"]
    table = pd.DataFrame(rows, columns=columns)
    kernels = pd.DataFrame(sorted(counts.items()), columns=["op_type", "count"]).reset_index(
        drop=True
    )
    result = FusionResult(table, kernels, _op_rows(exported, optimized))
    if warn and result.unfused_ops:
        warnings.warn(
            f"{len(result.unfused_ops)} adds / concats / pools exported quantized still run in "
            f"FP32 in ONNX Runtime ({', '.join(result.unfused_ops)}); see FusionResult.ops",
            stacklevel=2,
        )
    if warn and result.unfused:
        warnings.warn(
            f"{len(result.unfused)} of {len(table)} quantized layers did not fuse into ONNX "
            f"Runtime integer kernels ({', '.join(result.unfused)}); they run in FP32 plus the "
            "Q/DQ work, which is slower than FP32 — see the fusion table for the reasons",
            stacklevel=2,
        )
    return result
