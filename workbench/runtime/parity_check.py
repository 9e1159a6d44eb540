"""Does ONNX Runtime compute what the simulated model computes?

The INT8 ONNX model runs in ONNX Runtime and the simulated model in torch, on the same batches.
Per output: top-1 agreement (for ``[N, classes]`` outputs), cosine similarity, the largest
absolute difference and that difference in units of the output's quantization step, and, given
the FP32 model, both models' cosine to FP32 (what the notebook promises against what ONNX
Runtime delivers). Per layer (optional): the same at every output quantizer (compared code by
code) and every quantized Linear's output.

The output's quantization step: the scale of the quantizer the output comes from, if any;
otherwise the step of an 8-bit grid spanning the simulated output's range ((max - min) / 255).
Integer kernels round differently from float math only at ties, so a few one-step differences
are expected; float ops computed differently by torch and ONNX (GELU as Erf, LayerNorm) can
flip roundings at the next quantizer and compound, which is why this is measured, not assumed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import torch
from onnx import helper, numpy_helper
from torch import nn

from workbench.engine.batches import iter_batches, model_inputs
from workbench.engine.graph_quantizers import OutputQuantized
from workbench.engine.layers import QuantizedLayer
from workbench.runtime.onnx_export import flatten_outputs
from workbench.runtime.ort_session import make_session, run_session
from workbench.runtime.qdq_graph import read_graph_info

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


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else float("nan")


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
    args, kwargs = model_inputs(batch)
    with torch.no_grad():
        output = model(*args, **kwargs)
    return [tensor.detach().cpu().numpy() for _, tensor in flatten_outputs(output)]


def _with_layer_outputs(path: str | os.PathLike, tmp: Path) -> tuple[Path, dict, dict]:
    """A copy of the model whose extra outputs are every output quantizer's codes and every
    quantized Linear's output; returns it, {name: tensor} and {tensor: (scale, zero point)}."""
    model = onnx.load(str(path))
    info = read_graph_info(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    inits = {init.name: init for init in model.graph.initializer}
    existing = {out.name for out in model.graph.output}
    tensors: dict[str, str] = {}
    qparams: dict[str, tuple[float, int]] = {}
    for site, tensor in info.sites.items():
        node = producer.get(tensor)
        if node is None or node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        scale = float(numpy_helper.to_array(inits[node.input[1]]))
        zero = numpy_helper.to_array(inits[node.input[2]])
        tensors[site] = tensor
        qparams[tensor] = (scale, int(zero))
        elem = onnx.helper.tensor_dtype_to_np_dtype(inits[node.input[2]].data_type)
        if tensor not in existing:
            model.graph.output.append(
                helper.make_tensor_value_info(tensor, helper.np_dtype_to_tensor_dtype(elem), None)
            )
            existing.add(tensor)
    for layer in info.layers:
        if layer.op_type == "MatMul" or layer.op_type == "Gemm":
            tensors.setdefault(layer.name, layer.output)
            if layer.output not in existing:
                model.graph.output.append(
                    helper.make_tensor_value_info(layer.output, onnx.TensorProto.FLOAT, None)
                )
                existing.add(layer.output)
    extended = tmp / "per_layer.onnx"
    onnx.save(model, str(extended))
    return extended, tensors, qparams


def _per_layer(simulated, path, batches, threads) -> pd.DataFrame:
    with tempfile.TemporaryDirectory(prefix="workbench-parity-") as tmp:
        extended, tensors, qparams = _with_layer_outputs(path, Path(tmp))
        session = make_session(extended, threads)
        names = [o.name for o in session.get_outputs()]
        captured: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
        handles = []
        for module_name, module in simulated.named_modules():
            key = None
            if isinstance(module, OutputQuantized) and module_name in tensors:
                key = module_name
            elif isinstance(module, QuantizedLayer) and module.layer_name in tensors:
                key = module.layer_name
            if key is not None:
                handles.append(
                    module.register_forward_hook(
                        lambda m, i, o, k=key: captured[k].append(o.detach().cpu().numpy())
                    )
                )
        ort_values: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
        try:
            for batch in batches:
                _torch_outputs(simulated, batch)
                results = dict(zip(names, run_session(session, batch), strict=True))
                for layer, tensor in tensors.items():
                    value = results[tensor]
                    if tensor in qparams:
                        scale, zero = qparams[tensor]
                        value = (value.astype(np.float32) - zero) * scale
                    ort_values[layer].append(value)
        finally:
            for handle in handles:
                handle.remove()
    rows = []
    for layer, tensor in tensors.items():
        if not captured[layer] or len(captured[layer]) != len(ort_values[layer]):
            continue
        sim = np.concatenate([v.reshape(-1) for v in captured[layer]])
        ort = np.concatenate([v.reshape(-1) for v in ort_values[layer]])
        if sim.shape != ort.shape:
            continue
        step = qparams[tensor][0] if tensor in qparams else None
        row = {"layer": layer, "kind": "output quantizer" if step else "linear output"}
        row |= _compare(ort, sim, step)
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
    batches = list(iter_batches(data, max_batches, what="data"))
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
