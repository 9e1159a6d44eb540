"""QuantResult: what ``ptq`` and ``qat`` return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import nn

from workbench.analysis.report import Report
from workbench.engine.config import QuantConfig
from workbench.engine.prepare import LayerPlan


@dataclass
class QuantResult:
    """A quantized model and what was measured about it.

    Attributes
    ----------
    model : nn.Module
        Simulates the quantized model (fake quantization); the input model is untouched.
    fp32_model : nn.Module
        The FP32 reference as the quantized model sees it (BatchNorm folded, no quantizers).
    report : Report
        Per-layer error, storage, summary, plots.
    config : QuantConfig
    method : str
        ``"ptq"`` or ``"qat"``.
    history : pandas.DataFrame or None
        QAT training history (None for PTQ).
    """

    model: nn.Module
    fp32_model: nn.Module
    report: Report
    config: QuantConfig
    plans: list[LayerPlan]
    method: str = "ptq"
    history: pd.DataFrame | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"QuantResult(method={self.method!r})\n{self.report.summary_text()}"

    def _repr_html_(self) -> str:
        return self.report._repr_html_()

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, str]:
        return self.report._repr_mimebundle_(include, exclude)
