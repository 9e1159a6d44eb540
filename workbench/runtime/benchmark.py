"""FP32 against INT8 on ONNX Runtime CPU, measured side by side.

Both models (and any ``others``) run in the same process, in alternating blocks of runs with
the same threads and inputs, so that machine noise hits them alike; each block starts with an
untimed run, so that no model is timed with caches the other one just filled. The table reports
latency percentiles, throughput, file sizes and the speedup.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.engine.calibration.batches import batch_size, inference_inputs
from workbench.errors import ConfigError
from workbench.runtime.cpu_features import CpuFeatures, detect_cpu_features
from workbench.runtime.external_data import model_file_bytes
from workbench.runtime.file_precision import file_precision
from workbench.runtime.ort_session import make_session, session_feeds

REPORT_TITLE = "ONNX Runtime benchmark"


# Below this FP32 latency, fixed per-call costs dominate and INT8 cannot show its speed.
SMALL_MODEL_MS = 0.5


@dataclass
class BenchmarkResult:
    """Latency and size of FP32 against INT8 (and any other models) on ONNX Runtime.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per model: ``precision`` (what the file computes in: FP32, INT8, int4
        weights, mixed), ``latency_p50_ms``, ``latency_p90_ms``, ``latency_mean_ms``,
        ``throughput_per_s`` (samples / s at p50), ``file_bytes``, ``size_vs_fp32``,
        ``speedup_vs_fp32`` (FP32 p50 / this p50).
    speedup : float
        FP32 p50 latency / INT8 p50 latency.
    cpu : CpuFeatures
        AVX2 / AVX512 / VNNI / AMX, with ``cpu.int8_outlook``.
    """

    table: pd.DataFrame
    speedup: float
    cpu: CpuFeatures
    threads: int | None
    batch_size: int
    precision: str = "INT8"  # what the quantized file computes in (``file_precision``)

    def speed_text(self) -> str:
        """``INT8 2.31x faster than FP32``, or ``1.15x slower`` with the likely reason."""
        if self.speedup >= 1.0:
            return f"{self.precision} {self.speedup:.2f}x faster than FP32"
        text = f"{self.precision} {1.0 / self.speedup:.2f}x slower than FP32"
        fp32_ms = float(self.table.set_index("model").loc["fp32", "latency_p50_ms"])
        if fp32_ms < SMALL_MODEL_MS:
            return text + (
                f" (FP32 takes {fp32_ms:.3f} ms: the model is too small for integer kernels to "
                "pay for the quantize / dequantize steps around them)"
            )
        return text + " (see the fusion table: a layer that did not fuse runs FP32 with extra work)"

    def summary_text(self) -> str:
        int8 = self.table.set_index("model").loc["int8"]
        return (
            f"{self.speed_text()} on ONNX Runtime "
            f"(p50 {int8['latency_p50_ms']:.3f} ms, batch {self.batch_size}, "
            f"{self.threads or 'default'} thread(s)); file {int8['size_vs_fp32']:.2f}x FP32.\n"
            f"CPU {self.cpu.summary()}"
        )

    def __repr__(self) -> str:
        return f"{self.summary_text()}\n{self.table.to_string(index=False)}"

    def _repr_html_(self) -> str:
        import html

        lines = "<br>".join(html.escape(line) for line in self.summary_text().splitlines())
        return f"<div><b>{lines}</b></div>" + self.table.to_html(
            index=False,
            float_format="{:,.3f}".format,  # positional: no 1.033e+05
        )


def _as_path(model: Any, role: str, example_input: Any, workdir: Path) -> Path:
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"{role} model file {str(path)!r} does not exist; export it first")
        return path
    if role == "int8" and hasattr(model, "export_onnx"):
        return Path(model.export_onnx(workdir / "int8.onnx", example_input, check_fusion=False))
    if role != "int8" and hasattr(model, "export_fp32_onnx"):
        return Path(model.export_fp32_onnx(workdir / f"{role}.onnx", example_input))
    if role != "int8" and hasattr(model, "forward"):
        from workbench.runtime.onnx_export import export_fp32_onnx

        return export_fp32_onnx(model, workdir / f"{role}.onnx", example_input)
    raise ConfigError(
        f"{role} must be an .onnx path or a quantization result, got {type(model).__name__}"
    )


def time_sessions(
    sessions: dict[str, Any], feeds: dict[str, dict], warmup: int, runs: int, block: int = 5
) -> dict[str, np.ndarray]:
    """Latency (ms) of each session, measured in alternating blocks.

    Every round runs each session once untimed (to bring its weights back into the caches the
    other model evicted) and then ``block`` timed runs; the order rotates between rounds.
    Machine noise thus hits all models alike, and each is timed warm, as a deployed model runs.
    """
    names = list(sessions)
    for _ in range(warmup):
        for name in names:
            sessions[name].run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    round_index = 0
    while any(len(values) < runs for values in times.values()):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            session, feed = sessions[name], feeds[name]
            session.run(None, feed)
            for _ in range(min(block, runs - len(times[name]))):
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append((time.perf_counter() - start) * 1000.0)
        round_index += 1
    return {name: np.asarray(values) for name, values in times.items()}


def benchmark(
    fp32: Any,
    int8: Any,
    example_input: Any,
    threads: int | None = 1,
    warmup: int = 10,
    runs: int = 50,
    others: dict[str, Any] | None = None,
) -> BenchmarkResult:
    """Benchmark an FP32 and an INT8 ONNX model on ONNX Runtime CPU, side by side.

    Parameters
    ----------
    fp32, int8 : path or QuantResult
        ``.onnx`` files, or a result (exported to a temporary directory: ``fp32`` via
        ``export_fp32_onnx``, ``int8`` via ``export_onnx``). ``fp32`` may also be an nn.Module.
    example_input : tensor, tuple or dict of tensors
        One batch, as the model takes it; its first dimension is the batch size.
    threads : int or None
        ONNX Runtime intra-op threads (None: ONNX Runtime's default).
    warmup, runs : int
        Untimed runs of each model first, then timed runs of each (in alternating blocks).
    others : dict, optional
        More models to time in the same rounds, e.g. ``{"ort quantize_static": path}``.
    """
    if runs < 1 or warmup < 0:
        raise ConfigError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    example_input = inference_inputs(example_input)  # labels would add a loss output
    with tempfile.TemporaryDirectory(prefix="workbench-bench-") as tmp:
        workdir = Path(tmp)
        paths = {
            "fp32": _as_path(fp32, "fp32", example_input, workdir),
            "int8": _as_path(int8, "int8", example_input, workdir),
        }
        for name, model in (others or {}).items():
            paths[str(name)] = _as_path(model, str(name), example_input, workdir)
        sessions = {name: make_session(path, threads) for name, path in paths.items()}
        feeds = {name: session_feeds(session, example_input) for name, session in sessions.items()}
        times = time_sessions(sessions, feeds, warmup, runs)
        sizes = {name: model_file_bytes(path) for name, path in paths.items()}
        precisions = {name: file_precision(path) for name, path in paths.items()}
    samples = batch_size(example_input)
    fp32_p50 = float(np.percentile(times["fp32"], 50))
    rows = []
    for name, values in times.items():
        p50 = float(np.percentile(values, 50))
        rows.append(
            {
                "model": name,
                "precision": precisions[name],
                "latency_p50_ms": p50,
                "latency_p90_ms": float(np.percentile(values, 90)),
                "latency_mean_ms": float(values.mean()),
                "throughput_per_s": samples / (p50 / 1000.0),
                "file_bytes": int(sizes[name]),
                "size_vs_fp32": sizes[name] / sizes["fp32"],
                "speedup_vs_fp32": fp32_p50 / p50,
            }
        )
    table = pd.DataFrame(rows)
    speedup = float(table.set_index("model").loc["int8", "speedup_vs_fp32"])
    result = BenchmarkResult(
        table, speedup, detect_cpu_features(), threads, samples, precisions["int8"]
    )
    report = getattr(int8, "report", None)
    if report is not None and hasattr(report, "extra_tables"):
        report.extra_tables[REPORT_TITLE] = table
    return result
