"""Quantization Workbench: PTQ / QAT for PyTorch models, per-layer reports, INT8 ONNX.

import workbench as wb
res = wb.ptq(model, calib_data, config=wb.QuantConfig.preset("int8"))
res.report.layers
"""

from workbench._version import __version__ as __version__
from workbench.analysis.pareto import pareto_table
from workbench.analysis.report import Report
from workbench.core.qtensor import QTensor, quantize_tensor
from workbench.core.scheme import Scheme
from workbench.engine.config import QuantConfig
from workbench.errors import (
    CalibrationError,
    ConfigError,
    DistributedError,
    ExportError,
    MetricError,
    MissingDependencyError,
    ModelError,
    NonFiniteError,
    WorkbenchError,
)
from workbench.workflows.autotune import autotune
from workbench.workflows.mixed_precision import auto_mixed_precision, keep_most_sensitive_fp32
from workbench.workflows.ptq import ptq
from workbench.workflows.qat import qat
from workbench.workflows.result import QuantResult
from workbench.workflows.sensitivity import sensitivity

__all__ = [
    "CalibrationError",
    "ConfigError",
    "DistributedError",
    "ExportError",
    "MetricError",
    "MissingDependencyError",
    "ModelError",
    "NonFiniteError",
    "QTensor",
    "QuantConfig",
    "QuantResult",
    "Report",
    "Scheme",
    "WorkbenchError",
    "auto_mixed_precision",
    "autotune",
    "benchmark",
    "generation_benchmark",
    "keep_most_sensitive_fp32",
    "load_ipython_extension",
    "panel",
    "pareto_table",
    "ptq",
    "qat",
    "quantize_tensor",
    "sensitivity",
]


def load_ipython_extension(ipython) -> None:
    """``%load_ext workbench``: register the ``%quantize`` magics (imported only now)."""
    from workbench.notebook.magic import load_ipython_extension as load

    load(ipython)


def __getattr__(name: str):
    # wb.panel imports ipywidgets, so only when it is asked for
    if name == "panel":
        from workbench.notebook.panel import panel

        return panel
    # wb.benchmark imports onnx and onnxruntime, so only when it is asked for
    if name == "benchmark":
        from workbench.runtime.benchmark import benchmark

        return benchmark
    # wb.generation_benchmark runs onnxruntime-genai (an optional extra), only when asked for
    if name == "generation_benchmark":
        from workbench.runtime.genai_generation import generation_benchmark

        return generation_benchmark
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
