"""Quantization Workbench: PTQ / QAT for PyTorch models, per-layer reports, INT8 ONNX.

import workbench as wb
res = wb.ptq(model, calib_data, config=wb.QuantConfig.preset("int8"))
res.report.layers
"""

from workbench.analysis.report import Report
from workbench.core.qtensor import QTensor, quantize_tensor
from workbench.core.scheme import Scheme
from workbench.engine.config import QuantConfig
from workbench.errors import (
    CalibrationError,
    ConfigError,
    ExportError,
    ModelError,
    NonFiniteError,
    WorkbenchError,
)
from workbench.workflows.ptq import ptq
from workbench.workflows.result import QuantResult

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "ConfigError",
    "ExportError",
    "ModelError",
    "NonFiniteError",
    "QTensor",
    "QuantConfig",
    "QuantResult",
    "Report",
    "Scheme",
    "WorkbenchError",
    "ptq",
    "quantize_tensor",
]
