"""ONNX Runtime sessions on CPU and the feeds for them, built from a model's example input."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from workbench.errors import MissingDependencyError
from workbench.runtime.onnx_export import input_names

ORT_PIP = "pip install onnxruntime"
QUIET = 3  # ORT log severity: errors only (no "optimized model is hardware specific" notice)


def require_onnxruntime():
    """The ``onnxruntime`` module, or one clear error with the pip line."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            f"onnxruntime is not installed; run `{ORT_PIP}` to export-check and benchmark"
        ) from exc
    return onnxruntime


def make_session(
    path: str | os.PathLike,
    threads: int | None = 1,
    optimized_path: str | os.PathLike | None = None,
    optimize: bool = True,
):
    """A CPU InferenceSession; ``threads=None`` lets ONNX Runtime choose.

    ``optimized_path`` saves the graph ONNX Runtime actually runs (after QDQ fusion).
    """
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_feeds(session, example_input: Any) -> dict[str, np.ndarray]:
    """Map an example input (tensor, tuple, dict) onto the session's inputs.

    Names follow the export (``input``, ``input_0``, ..., dict keys); inputs the exported graph
    dropped (unused by the model) are left out.
    """
    values, names = input_names(example_input)
    arrays = {name: value.detach().cpu().numpy() for name, value in zip(names, values, strict=True)}
    wanted = [i.name for i in session.get_inputs()]
    if all(name in arrays for name in wanted):
        return {name: arrays[name] for name in wanted}
    ordered = list(arrays.values())
    return {name: ordered[i] for i, name in enumerate(wanted) if i < len(ordered)}


def run_session(session, example_input: Any) -> list[np.ndarray]:
    """All outputs of one run, in the graph's output order."""
    return session.run(None, session_feeds(session, example_input))
