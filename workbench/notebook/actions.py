"""What both notebook front ends do, as calls of the public functions.

The magic and the panel call these and nothing else: ``wb.ptq`` / ``wb.qat`` /
``wb.auto_mixed_precision`` / ``wb.keep_most_sensitive_fp32`` to quantize, ``wb.sensitivity``
to rank the layers,
``QuantResult.export_onnx`` to export, ``wb.benchmark`` to time FP32 against INT8,
``QuantResult.generation_benchmark`` to time a decoder's generation on ONNX Runtime GenAI,
``wb.pareto_table`` to compare runs, the engine's planner (``plan_layers``) to list the layers
a config can keep FP32. No quantization logic lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from workbench.analysis.pareto import pareto_table
from workbench.engine.capture.prepare import QUANTIZED, matches_any, plan_layers
from workbench.engine.config import PRESETS, QuantConfig
from workbench.errors import CalibrationError, ConfigError
from workbench.notebook.option_spec import SEARCH, TRAINING
from workbench.notebook.options import values_for
from workbench.workflows.autotune import autotune as run_autotune
from workbench.workflows.mixed_precision import auto_mixed_precision, keep_most_sensitive_fp32
from workbench.workflows.ptq import ptq
from workbench.workflows.qat import qat
from workbench.workflows.sensitivity import sensitivity as rank_layers

PRESET_NAMES = tuple(PRESETS)


def quantizable_layers(model: nn.Module, preset: str) -> list[str]:
    """The layers the preset would quantize (a preset excludes nothing), in model order: the
    ones a user can choose to keep FP32 (the engine's planner decides, embeddings and the
    MultiheadAttention rule included)."""
    plans = plan_layers(model, QuantConfig.preset(preset))
    return [plan.name for plan in plans if plan.status == QUANTIZED]


def layers_matching(names: Sequence[str], patterns: Sequence[str]) -> tuple[str, ...]:
    """The names that are one of ``patterns`` or match one as a glob (the engine's rule for
    the layers kept FP32)."""
    return tuple(name for name in names if matches_any(name, tuple(patterns)))


def quantize(
    model: nn.Module,
    config: QuantConfig,
    method: str = "ptq",
    calib_data: Any = None,
    train_data: Any = None,
    loss_fn: Callable | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    progress: bool = True,
    sensitivity: pd.DataFrame | None = None,
    report_data: Any = None,
    **options: Any,
):
    """``wb.ptq`` or ``wb.qat`` with the options that apply to it; with ``max_drop``,
    ``wb.auto_mixed_precision``; with ``keep_most_sensitive`` > 0,
    ``wb.keep_most_sensitive_fp32`` (ranked by ``sensitivity`` when given). With QAT, the
    same search runs first inside ``wb.qat`` and training uses the precisions it chose.
    ``options``: the search and training options of the option table (``options.py``),
    None for one not given. ``report_data``: held-out batches for the report's per-layer
    errors (its first 8)."""
    search = values_for(SEARCH, options)
    if search.pop("auto", False):
        return autotune(model, calib_data, eval_fn, config, search, method)
    keep, max_drop = search.pop("keep_most_sensitive", 0), search.get("max_drop")
    common = {"config": config, "progress": progress, "report_data": report_data}
    if method == "ptq":
        if calib_data is None and not config.dynamic:
            raise CalibrationError(
                "PTQ needs calibration data; pass calib_data (a DataLoader or a list of batches)"
            )
        if keep > 0:
            return keep_most_sensitive_fp32(
                model,
                calib_data,
                keep,
                eval_fn=eval_fn,
                sensitivity=sensitivity,
                **common,
                **search,
            )
        if max_drop is not None:
            return auto_mixed_precision(model, calib_data, eval_fn, **common, **search)
        return ptq(model, calib_data, eval_fn=eval_fn, **common, **search)
    if method == "qat":
        if train_data is None or loss_fn is None:
            raise CalibrationError(
                "QAT needs train_data and loss_fn; pass both (wb.panel(..., train_data=, loss_fn=))"
            )
        training = values_for(TRAINING, options)
        if calib_data is not None:
            training["calib_data"] = calib_data
        return qat(
            model,
            train_data,
            loss_fn=loss_fn,
            eval_fn=eval_fn,
            max_drop=max_drop,
            keep_most_sensitive=keep,
            sensitivity=sensitivity,
            **common,
            **training,
        )
    raise ConfigError(f"unknown method {method!r}; choose 'ptq' or 'qat'")


def autotune(
    model: nn.Module,
    calib_data: Any,
    eval_fn: Callable[[nn.Module], float] | None,
    config: QuantConfig,
    search: dict[str, Any],
    method: str = "ptq",
):
    """``wb.autotune`` with ``max_drop`` (default 0.01) and ``num_batches`` of ``search``;
    it chooses the precision itself, so the scheme options and ``keep_most_sensitive`` are
    not combined with it."""
    if method != "ptq":
        raise ConfigError("--auto searches PTQ runs; drop --method qat")
    if search.get("keep_most_sensitive"):
        raise ConfigError(
            "--auto keeps the most sensitive layers higher itself; drop --keep-most-sensitive"
        )
    if config != QuantConfig.preset("int8"):
        raise ConfigError(
            "--auto chooses the preset, scheme and methods itself; drop the scheme and method "
            "options (give the presets to start from with wb.autotune(..., presets=...))"
        )
    if calib_data is None:
        raise CalibrationError("--auto needs calibration data; pass --calib")
    max_drop = search.get("max_drop")
    return run_autotune(
        model,
        calib_data,
        eval_fn,
        max_drop=0.01 if max_drop is None else max_drop,
        num_batches=search.get("num_batches"),
    )


def sensitivity(
    model: nn.Module,
    calib_data: Any,
    config: QuantConfig,
    eval_fn: Callable[[nn.Module], float] | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    on_layer: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """``wb.sensitivity``: one row per quantized layer, most sensitive first."""
    if calib_data is None:
        raise CalibrationError(
            "sensitivity needs calibration data; pass calib_data (a DataLoader or a list of "
            "batches)"
        )
    return rank_layers(
        model,
        calib_data,
        eval_fn=eval_fn,
        config=config,
        num_batches=num_batches,
        progress=progress,
        on_layer=on_layer,
    )


def pareto_optimal(runs: Sequence[dict[str, Any]]) -> list[bool]:
    """``wb.pareto_table`` over runs given as dicts with ``run``, ``metric``, ``size_bytes``
    and ``latency_ms`` (None when not benchmarked): whether each run is non-dominated."""
    if not runs:
        return []
    return [bool(flag) for flag in pareto_table(list(runs))["pareto_optimal"]]


def first_input(data: Any) -> Any:
    """The model input of the first batch of ``data`` (the default example for export)."""
    from workbench.engine.calibration.batches import iter_batches, model_inputs

    args, kwargs = model_inputs(next(iter_batches(data, 1)))
    return args[0] if args else kwargs


def export(result, path: str | Path, example_input: Any) -> Path:
    """``result.export_onnx(path, example_input)``: the INT8 QDQ ONNX file. The export checks
    ONNX Runtime's fusion and adds its table to the report."""
    written = Path(result.export_onnx(path, example_input))
    result.extras["onnx_path"] = written
    return written


def benchmark(result, example_input: Any, onnx_path: str | Path | None = None, threads: int = 1):
    """``wb.benchmark`` of the result's FP32 model against its INT8 model (the file at
    ``onnx_path`` when exported, else a temporary export); the table goes into the report."""
    from workbench.runtime.benchmark import REPORT_TITLE
    from workbench.runtime.benchmark import benchmark as run_benchmark

    int8 = result if onnx_path is None else onnx_path
    bench = run_benchmark(result, int8, example_input, threads=threads)
    result.report.extra_tables[REPORT_TITLE] = bench.table
    result.extras["benchmark"] = bench
    return bench


def check_generation_model(model: nn.Module) -> None:
    """An ``ExportError`` naming the supported families unless ONNX Runtime GenAI's builder
    takes the model."""
    from workbench.runtime.genai_export import check_genai_family

    check_genai_family(model)


def generation_benchmark(result, tokenizer: Any, data: Any, prompts: int = 4):
    """``result.generation_benchmark``: the decoder's GenAI int4 folder beside the builder's
    FP32 and RTN int4 builds, on the first 32 tokens of ``prompts`` rows of ``data``'s first
    batch (token ids); the table goes into the report."""
    check_generation_model(result.model)  # before anything is built: names the families
    example = first_input(data)
    ids = example.get("input_ids") if isinstance(example, dict) else example
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise ConfigError(
            "the generation benchmark takes its prompts from the calibration batches, which "
            "must be token ids [batch, tokens] (or dicts with input_ids)"
        )
    rows = [row[:32].tolist() for row in ids[:prompts]]
    return result.generation_benchmark(tokenizer, rows)


def fusion_table(result) -> tuple[str, pd.DataFrame | None]:
    """The title and table of ONNX Runtime's fusion check the export added to the report."""
    from workbench.runtime.fusion_check import REPORT_TITLE

    return REPORT_TITLE, result.report.extra_tables.get(REPORT_TITLE)


def latencies_ms(bench) -> tuple[float, float]:
    """(FP32, INT8) median latency in ms of a benchmark result."""
    table = bench.table.set_index("model")
    return float(table.loc["fp32", "latency_p50_ms"]), float(table.loc["int8", "latency_p50_ms"])
