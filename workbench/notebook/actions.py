"""What both notebook front ends do, as calls of the public functions.

The magic and the panel call these and nothing else: ``wb.ptq`` / ``wb.qat`` to quantize,
``QuantResult.export_onnx`` to export, ``wb.benchmark`` to time FP32 against INT8. No
quantization logic lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from workbench.engine.config import QuantConfig
from workbench.errors import CalibrationError, ConfigError

EXPORT_TABLE = "Export"
BENCHMARK_TABLE = "Benchmark"


def quantize(
    model: nn.Module,
    config: QuantConfig,
    method: str = "ptq",
    calib_data: Any = None,
    train_data: Any = None,
    loss_fn: Callable | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    num_batches: int | None = None,
    progress: bool = True,
):
    """``wb.ptq`` or ``wb.qat`` with the options that apply to it."""
    import workbench as wb

    if method == "ptq":
        if calib_data is None:
            raise CalibrationError(
                "PTQ needs calibration data; pass calib_data (a DataLoader or a list of batches)"
            )
        return wb.ptq(
            model,
            calib_data,
            config=config,
            eval_fn=eval_fn,
            num_batches=num_batches,
            progress=progress,
        )
    if method == "qat":
        if train_data is None or loss_fn is None:
            raise CalibrationError(
                "QAT needs train_data and loss_fn; pass both (wb.panel(..., train_data=, loss_fn=))"
            )
        options: dict[str, Any] = {"epochs": epochs, "lr": lr, "calib_data": calib_data}
        options = {key: value for key, value in options.items() if value is not None}
        return wb.qat(
            model,
            train_data,
            config=config,
            loss_fn=loss_fn,
            eval_fn=eval_fn,
            progress=progress,
            **options,
        )
    raise ConfigError(f"unknown method {method!r}; choose 'ptq' or 'qat'")


def first_input(data: Any) -> Any:
    """The model input of the first batch of ``data`` (the default example for export)."""
    from workbench.engine.batches import iter_batches, model_inputs

    args, kwargs = model_inputs(next(iter_batches(data, 1)))
    return args[0] if args else kwargs


def export(result, path: str | Path, example_input: Any) -> Path:
    """``result.export_onnx(path, example_input)``: the INT8 QDQ ONNX model's path."""
    return Path(result.export_onnx(path, example_input))


def benchmark(result, example_input: Any, threads: int = 1):
    """``wb.benchmark`` of the FP32 model against the exported INT8 model."""
    import workbench as wb

    return wb.benchmark(result.fp32_model, result, example_input, threads=threads)


def latencies_ms(benchmark_result) -> tuple[float, float]:
    """(FP32 ms, INT8 ms) of a benchmark result."""
    raise NotImplementedError


def benchmark_table(benchmark_result) -> pd.DataFrame:
    """The benchmark's table as a DataFrame."""
    return benchmark_result.table


def export_into(result, path: str | Path, example_input: Any) -> Path:
    """Export, and add the file to the result's report (an ``Export`` table)."""
    path = export(result, path, example_input)
    table = pd.DataFrame([{"path": str(path), "file_bytes": path.stat().st_size}])
    result.report.extra_tables[EXPORT_TABLE] = table
    result.extras["onnx_path"] = path
    return path


def benchmark_into(result, example_input: Any, threads: int = 1):
    """Benchmark, and add the timings to the result's report (a ``Benchmark`` table)."""
    bench = benchmark(result, example_input, threads)
    result.report.extra_tables[BENCHMARK_TABLE] = benchmark_table(bench)
    result.extras["benchmark"] = bench
    return bench
