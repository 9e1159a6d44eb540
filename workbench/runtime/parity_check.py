"""Does ONNX Runtime compute what the simulated model computes?

The INT8 ONNX model runs in ONNX Runtime and the simulated model in torch, on the same batches.
Per output: top-1 agreement (for ``[N, classes]`` outputs), cosine similarity, the largest
absolute difference and that difference in units of the output's quantization step, and, given
the FP32 model, both models' cosine to FP32 (what the notebook promises against what ONNX
Runtime delivers). Per layer (optional): the same at every output quantizer and every input
quantizer of its own (compared code by code; a mismatch is a code that differs), and at the
FP32 output of every Linear that is not quantized next. Those tensors become extra outputs of
a copy of the model; ONNX Runtime fuses it as it fuses the original.

The output's quantization step: the scale of the quantizer the output comes from, if any;
otherwise the step of an 8-bit grid spanning the simulated output's range ((max - min) / 255).
Integer kernels round differently from float math only at ties, so a few one-step differences
are expected; float ops computed differently by torch and ONNX (GELU as Erf, LayerNorm) can
flip roundings at the next quantizer and compound, which is why this is measured, not assumed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import torch
from onnx import helper, numpy_helper
from torch import nn

from workbench.atomic_file import temporary_path_beside
from workbench.core.metrics import cosine
from workbench.engine.calibration.batches import inference_inputs, iter_batches, model_inputs
from workbench.engine.placement.graph_quantizers import OutputQuantized
from workbench.engine.placement.layers import QuantizedLayer
from workbench.runtime.export_inputs import flatten_outputs
from workbench.runtime.external_data import has_external_data
from workbench.runtime.graph_info import read_graph_info
from workbench.runtime.onnx_maps import tensor_map
from workbench.runtime.ort_session import make_session, run_session

REPORT_TITLE = "ONNX Runtime parity"
REPORT_LAYERS_TITLE = "ONNX Runtime parity per layer"


@dataclass
class ParityResult:
    """ONNX Runtime against the simulated model.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per model output.
    layers : pandas.DataFrame or None
        One row per output quantizer / quantized Linear (``per_layer=True``).
    """

    table: pd.DataFrame
    layers: pd.DataFrame | None = None

    def summary_text(self) -> str:
        row = self.table.iloc[0]
        text = f"ONNX Runtime vs simulated ({row['output']}): cosine {row['cosine']:.6f}"
        if pd.notna(row.get("top1_agreement")):
            text += f", top-1 agreement {100 * row['top1_agreement']:.2f}%"
        text += f", max |diff| {row['max_abs_diff']:.4g} ({row['max_diff_steps']:.2f} steps)"
        if pd.notna(row.get("cosine_ort_vs_fp32")):
            text += (
                f"; cosine to FP32: ONNX Runtime {row['cosine_ort_vs_fp32']:.5f}, "
                f"simulated {row['cosine_sim_vs_fp32']:.5f}"
            )
        return text

    def __repr__(self) -> str:
        return f"{self.summary_text()}\n{self.table.to_string(index=False)}"


def _compare(ort: np.ndarray, sim: np.ndarray, step: float | None) -> dict[str, float]:
    diff = np.abs(ort.astype(np.float64) - sim.astype(np.float64))
    if step is None:
        span = float(sim.max() - sim.min()) if sim.size else 0.0
        step = span / 255.0 if span > 0 else 1.0
    row = {
        "cosine": cosine(ort, sim),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "step": float(step),
        "max_diff_steps": float(diff.max() / step) if diff.size else 0.0,
        "top1_agreement": float("nan"),
    }
    if sim.ndim == 2 and sim.shape[1] > 1:
        row["top1_agreement"] = float((ort.argmax(1) == sim.argmax(1)).mean())
    return row


def _torch_outputs(model: nn.Module, batch: Any) -> list[np.ndarray]:
    args, kwargs = model_inputs(batch, model)
    with torch.no_grad():
        output = model(*args, **kwargs)
    return [tensor.detach().cpu().numpy() for _, tensor in flatten_outputs(output)]


@dataclass
class _Point:
    """One tensor compared layer by layer."""

    label: str
    kind: str  # "output quantizer", "input quantizer" or "linear output"
    layer: str  # output quantizer / quantized layer it belongs to
    tensor: str  # in the ONNX graph
    qparams: tuple[float, int] | None  # when the tensor holds integer codes


def _points(model: onnx.ModelProto) -> list[_Point]:
    """Output quantizers' codes, unshared input quantizers' codes, and the FP32 outputs of
    Linear layers that are not quantized next (exposing those keeps ONNX Runtime's fusion)."""
    info = read_graph_info(model)
    tensors = tensor_map(model.graph)
    producer, consumers = tensors.producer, tensors.consumers
    inits = {init.name: init for init in model.graph.initializer}

    def codes_of(tensor: str) -> tuple[float, int] | None:
        node = producer.get(tensor)
        if node is None or node.op_type != "QuantizeLinear" or len(node.input) < 3:
            return None
        scale, zero = (numpy_helper.to_array(inits[name]) for name in node.input[1:3])
        return float(scale), int(zero)

    def quantized_next(tensor: str) -> bool:
        for user in consumers.get(tensor, []):
            if user.op_type == "QuantizeLinear":
                return True
            if user.op_type in ("Relu", "Clip") and quantized_next(user.output[0]):
                return True
        return False

    points = [
        _Point(site, "output quantizer", site, tensor, codes_of(tensor))
        for site, tensor in info.sites.items()
        if codes_of(tensor) is not None
    ]
    seen = {point.tensor for point in points}
    nodes = {node.name: node for node in model.graph.node}
    # a layer called at several sites: its module's hooks see every call, so only its output
    # quantizers (one per call site) are compared
    called_at_sites = {layer.name for layer in info.layers if layer.call}
    for layer in info.layers:
        if layer.name in called_at_sites:
            continue
        node = nodes.get(layer.node)
        dequantize = producer.get(node.input[0]) if node is not None else None
        if dequantize is not None and dequantize.op_type == "DequantizeLinear":
            tensor = dequantize.input[0]
            if tensor not in seen and codes_of(tensor) is not None:
                label = f"{layer.name} (input)"
                points.append(
                    _Point(label, "input quantizer", layer.name, tensor, codes_of(tensor))
                )
                seen.add(tensor)
        if layer.op_type in ("MatMul", "Gemm") and not quantized_next(layer.output):
            points.append(_Point(layer.name, "linear output", layer.name, layer.output, None))
    return points


def _torch_modules(simulated: nn.Module, points: list[_Point]) -> dict[str, nn.Module]:
    """The module whose output is each point's value in the simulated model."""
    layers = {m.layer_name: m for m in simulated.modules() if isinstance(m, QuantizedLayer)}
    wrapped = {n: m for n, m in simulated.named_modules() if isinstance(m, OutputQuantized)}
    found: dict[str, nn.Module] = {}
    for point in points:
        layer = layers.get(point.layer)
        if point.kind == "output quantizer":
            module = wrapped.get(point.layer) or layer
        elif point.kind == "input quantizer":
            module = layer.input_quantizer if layer is not None else None
        else:
            module = layer
        if module is not None:
            found[point.label] = module
    return found


@contextlib.contextmanager
def _graph_copy_path(path) -> Iterator[Path]:
    if has_external_data(path):
        with temporary_path_beside(Path(path), ".per_layer.onnx") as extended:
            yield extended
        return
    with tempfile.TemporaryDirectory(prefix="workbench-parity-") as tmp:
        yield Path(tmp) / "per_layer.onnx"


def _per_layer(simulated, path, batches, threads) -> pd.DataFrame:
    model = onnx.load(str(path), load_external_data=False)  # the graph; weights stay on disk
    points = _points(model)
    existing = {out.name for out in model.graph.output}
    for point in points:
        if point.tensor not in existing:
            # element type only: ONNX Runtime infers the rest
            elem = onnx.TensorProto.FLOAT
            if point.qparams is not None:
                node = next(n for n in model.graph.node if point.tensor in n.output)
                zero = next(i for i in model.graph.initializer if i.name == node.input[2])
                elem = zero.data_type
            model.graph.output.append(helper.make_tensor_value_info(point.tensor, elem, None))
            existing.add(point.tensor)
    modules = _torch_modules(simulated, points)
    captured: dict[str, list[np.ndarray]] = {label: [] for label in modules}
    ort_values: dict[str, list[np.ndarray]] = {label: [] for label in modules}
    handles = [
        module.register_forward_hook(
            lambda m, i, o, k=label: captured[k].append(o.detach().cpu().numpy().copy())
        )
        for label, module in modules.items()
    ]
    # beside the model when its weights are in a data file there (ONNX Runtime reads external
    # data only from the model's own folder), else in a temporary folder
    with _graph_copy_path(path) as extended:
        onnx.save(model, str(extended))
        session = make_session(extended, threads)
        names = [o.name for o in session.get_outputs()]
        try:
            for batch in batches:
                _torch_outputs(simulated, batch)
                results = dict(zip(names, run_session(session, batch), strict=True))
                for point in points:
                    if point.label not in ort_values:
                        continue
                    value = results[point.tensor]
                    if point.qparams is not None:
                        scale, zero = point.qparams
                        value = (value.astype(np.float32) - zero) * scale
                    ort_values[point.label].append(value)
        finally:
            for handle in handles:
                handle.remove()
    rows = []
    for point in points:
        sim_parts, ort_parts = captured.get(point.label), ort_values.get(point.label)
        if not sim_parts or len(sim_parts) != len(ort_parts):
            continue  # a module called more than once per batch has no single counterpart
        sim = np.concatenate([v.reshape(-1) for v in sim_parts])
        ort = np.concatenate([v.reshape(-1) for v in ort_parts])
        if sim.shape != ort.shape:
            continue
        step = point.qparams[0] if point.qparams else None
        row = {"layer": point.label, "kind": point.kind} | _compare(ort, sim, step)
        row["mismatch_fraction"] = float((np.abs(ort - sim) > 0.5 * row["step"]).mean())
        row.pop("top1_agreement")
        rows.append(row)
    return pd.DataFrame(rows)


def check_parity(
    simulated: nn.Module,
    path: str | os.PathLike,
    data: Any,
    fp32_model: nn.Module | None = None,
    max_batches: int | None = 8,
    per_layer: bool = False,
    threads: int | None = None,
) -> ParityResult:
    """Compare the INT8 ONNX model in ONNX Runtime with ``simulated`` in torch on ``data``.

    ``data`` is a tensor, a list of batches or a DataLoader (as for calibration).
    """
    batches = list(iter_batches(data, max_batches, what="data", limit_name="max_batches"))
    batches = [inference_inputs(batch) for batch in batches]  # no labels: no loss output
    session = make_session(path, threads)
    output_names = [o.name for o in session.get_outputs()]
    ort_out: list[list[np.ndarray]] = [[] for _ in output_names]
    sim_out: list[list[np.ndarray]] = [[] for _ in output_names]
    fp32_out: list[list[np.ndarray]] = [[] for _ in output_names]
    for batch in batches:
        for i, value in enumerate(run_session(session, batch)):
            ort_out[i].append(value)
        for i, value in enumerate(_torch_outputs(simulated, batch)[: len(output_names)]):
            sim_out[i].append(value)
        if fp32_model is not None:
            for i, value in enumerate(_torch_outputs(fp32_model, batch)[: len(output_names)]):
                fp32_out[i].append(value)
    rows = []
    for i, name in enumerate(output_names):
        ort = np.concatenate(ort_out[i])
        sim = np.concatenate(sim_out[i])
        row = {"output": name, "shape": tuple(ort.shape)} | _compare(ort, sim, None)
        if fp32_model is not None and fp32_out[i]:
            fp32 = np.concatenate(fp32_out[i])
            row["cosine_ort_vs_fp32"] = cosine(ort, fp32)
            row["cosine_sim_vs_fp32"] = cosine(sim, fp32)
            row["cosine_gap"] = row["cosine_sim_vs_fp32"] - row["cosine_ort_vs_fp32"]
        rows.append(row)
    layers = _per_layer(simulated, path, batches, threads) if per_layer else None
    return ParityResult(pd.DataFrame(rows), layers)
