"""QuantResult: what ``ptq`` and ``qat`` return."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from workbench.analysis.report import Report
from workbench.engine.batches import inference_inputs
from workbench.engine.config import QuantConfig
from workbench.engine.prepare import LayerPlan
from workbench.runtime.export_guard import guarded_export
from workbench.workflows.input_signature import InputSpec, check_like_calibration


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
    writes_files : bool
        Whether ``export_onnx`` / ``export_fp32_onnx`` write: False on the processes of a
        ``torch.distributed`` job other than rank 0 (set it to True to write there too).
    input_signature : tuple of InputSpec
        Name, per-sample shape and dtype of each calibration input (export inputs must fit).
    """

    model: nn.Module
    fp32_model: nn.Module
    report: Report
    config: QuantConfig
    plans: list[LayerPlan]
    method: str = "ptq"
    history: pd.DataFrame | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    writes_files: bool = True
    input_signature: tuple[InputSpec, ...] | None = None

    def __repr__(self) -> str:
        return f"QuantResult(method={self.method!r})\n{self.report.summary_text()}"

    def _repr_html_(self) -> str:
        return self.report._repr_html_()

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, str]:
        return self.report._repr_mimebundle_(include, exclude)

    # ONNX export and ONNX Runtime checks (imported only when used) ---------------------------
    def export_onnx(
        self,
        path: str | os.PathLike,
        example_input: Any,
        dynamic_batch: bool = True,
        fp32_path: str | os.PathLike | None = None,
        check_fusion: bool = True,
        opset: int = 17,
        amx: bool | str = False,
        accuracy_level: int = 4,
    ) -> Path:
        """Write the quantized model as an INT8 QDQ ONNX model that ONNX Runtime fuses.

        Weights are INT8 initializers, scales and zero points those of ``self.model``; the
        file is written atomically. ``fp32_path`` also writes the FP32 model (same exporter
        settings) for :func:`workbench.benchmark`. With ``check_fusion`` ONNX Runtime's
        optimized graph is inspected: a warning names every quantized layer that did not
        fuse, and the table goes into the report. ``amx=True`` stores conv weights so that ONNX
        Runtime runs them on AMX tiles (same values); the default ``False`` keeps the file
        independent of the exporting CPU, ``"auto"`` follows this machine's CPU.
        Block-wise (``group_size``) Linear weights are stored packed in MatMulNBits nodes
        whose ``accuracy_level`` is given here (4 = int8 compute, fastest; 1 = FP32 compute).
        Training-only keys of a dict example (``labels``, ...) are dropped: the file takes the
        inference inputs and returns what inference returns (``logits``, never ``loss``).
        """
        from workbench.runtime.onnx_export import export_int8_onnx

        if not self.writes_files:  # a distributed job's other processes: rank 0 writes
            return Path(path)
        example_input = inference_inputs(example_input)  # the file never takes labels
        check_like_calibration(self.input_signature, example_input)
        with guarded_export(path, opset):
            written, _ = export_int8_onnx(
                self.model,
                path,
                example_input,
                dynamic_batch,
                opset,
                amx=amx,
                accuracy_level=accuracy_level,
            )
        if fp32_path is not None:
            self.export_fp32_onnx(fp32_path, example_input, dynamic_batch, opset)
        if check_fusion:
            self.fusion(written)
        return written

    def export_fp32_onnx(
        self,
        path: str | os.PathLike,
        example_input: Any,
        dynamic_batch: bool = True,
        opset: int = 17,
    ) -> Path:
        """Write the FP32 reference (BatchNorm folded, no quantizers) as ONNX."""
        from workbench.runtime.onnx_export import export_fp32_onnx

        if not self.writes_files:
            return Path(path)
        example_input = inference_inputs(example_input)
        check_like_calibration(self.input_signature, example_input)
        with guarded_export(path, opset):
            return export_fp32_onnx(self.fp32_model, path, example_input, dynamic_batch, opset)

    def fusion(self, onnx_path: str | os.PathLike, warn: bool = True):
        """Which quantized layers ONNX Runtime runs on integer kernels (a ``FusionResult``)."""
        from workbench.runtime.fusion_check import OPS_REPORT_TITLE, REPORT_TITLE, check_fusion

        result = check_fusion(onnx_path, warn=warn)
        self.report.extra_tables[REPORT_TITLE] = result.table
        if result.ops is not None and not result.ops.empty:
            self.report.extra_tables[OPS_REPORT_TITLE] = result.ops
        return result

    def parity(
        self,
        onnx_path: str | os.PathLike,
        data: Any,
        per_layer: bool = False,
        max_batches: int | None = 8,
    ):
        """ONNX Runtime against ``self.model`` on ``data`` (a ``ParityResult``): top-1
        agreement, cosine, max difference in quantization steps, cosine of both to FP32."""
        from workbench.runtime.parity_check import (
            REPORT_LAYERS_TITLE,
            REPORT_TITLE,
            check_parity,
        )

        result = check_parity(self.model, onnx_path, data, self.fp32_model, max_batches, per_layer)
        self.report.extra_tables[REPORT_TITLE] = result.table
        if result.layers is not None:
            self.report.extra_tables[REPORT_LAYERS_TITLE] = result.layers
        return result
