"""ONNX Runtime sessions on CPU and the feeds for them, built from a model's example input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import CalibrationError, ConfigError, MissingDependencyError, first_line
from workbench.runtime.export_inputs import input_names
from workbench.runtime.external_data import data_file_name, has_external_data

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
        if has_external_data(path):  # the optimized graph cannot hold its weights either
            name = data_file_name(Path(optimized_path))
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", name
            )
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
            )
    _check_file(path)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's InvalidArgument / Fail / NoSuchFile on a bad file
        raise ConfigError(
            f"ONNX Runtime cannot load {str(path)!r} ({first_line(exc)}); pass the path of "
            "an .onnx file that export_onnx / export_fp32_onnx wrote"
        ) from exc


def load_onnx_model(path: str | os.PathLike, with_weights: bool = True):
    """``onnx.load`` of a file given by the user; one ConfigError when it is not ONNX.
    ``with_weights=False``: the graph only, tensors kept in an external data file stay there."""
    import onnx

    _check_file(path)
    try:
        return onnx.load(str(path), load_external_data=with_weights)
    except Exception as exc:  # protobuf's DecodeError on a file that is not a model
        raise ConfigError(
            f"{str(path)!r} is not an ONNX model ({first_line(exc)}); pass the path of an "
            ".onnx file that export_onnx wrote"
        ) from exc


def _check_file(path: str | os.PathLike) -> None:
    if not isinstance(path, str | os.PathLike) or not os.path.isfile(path):
        raise ConfigError(f"no ONNX file at {str(path)!r}; pass the path that export_onnx returned")


def session_feeds(session, example_input: Any) -> dict[str, np.ndarray]:
    """Map an example input (tensor, tuple, dict) onto the session's inputs.

    Names follow the export (``input``, ``input_0``, ..., dict keys); inputs the exported graph
    dropped (unused by the model) are left out.
    """
    values, names = input_names(example_input)
    arrays = {name: value.detach().cpu().numpy() for name, value in zip(names, values, strict=True)}
    wanted = [i.name for i in session.get_inputs()]
    if all(name in arrays for name in wanted):
        feeds = {name: arrays[name] for name in wanted}
    else:
        ordered = list(arrays.values())
        feeds = {name: ordered[i] for i, name in enumerate(wanted) if i < len(ordered)}
    check_feeds(session, feeds)
    return feeds


ORT_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def check_feeds(session, feeds: dict[str, np.ndarray]) -> None:
    """One CalibrationError naming the input, what it got and what the model takes, before
    ONNX Runtime's own message about dimensions or types."""
    for spec in session.get_inputs():
        if spec.name not in feeds:
            raise CalibrationError(
                f"the ONNX model takes an input {spec.name!r} that the data does not give; "
                "pass batches shaped like the calibration data"
            )
        array = feeds[spec.name]
        expected_dtype = ORT_NUMPY_TYPES.get(spec.type)
        dims = [d if isinstance(d, int) else None for d in spec.shape]
        shape_ok = len(dims) == array.ndim and all(
            d is None or d == n for d, n in zip(dims, array.shape, strict=False)
        )
        if (expected_dtype is not None and array.dtype != expected_dtype) or not shape_ok:
            wanted = [d if d is not None else "N" for d in dims]
            expected = np.dtype(expected_dtype).name if expected_dtype else spec.type
            raise CalibrationError(
                f"input {spec.name!r} has shape {list(array.shape)} and dtype {array.dtype}; "
                f"the ONNX model takes shape {wanted} of {expected}; pass batches like the "
                "calibration data (e.g. x.float() for float32)"
            )


def run_session(session, example_input: Any) -> list[np.ndarray]:
    """All outputs of one run, in the graph's output order."""
    return session.run(None, session_feeds(session, example_input))
