"""QuantResult: what ``ptq`` and ``qat`` return."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from workbench.analysis.report import Report
from workbench.atomic_file import missing_folders, remove_empty_folders
from workbench.engine.calibration.batches import inference_inputs
from workbench.engine.capture.prepare import LayerPlan
from workbench.engine.config import QuantConfig
from workbench.engine.training.distributed import Job, share_report
from workbench.errors import ConfigError
from workbench.runtime.export_guard import DEFAULT_OPSET, guarded_export
from workbench.workflows.input_signature import InputSpec, check_like_calibration, input_signature
from workbench.workflows.stages import StageClock


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

    def _free_sequence(self) -> bool:
        """A ``transformers`` model exports with a dynamic sequence axis: any length fits."""
        return hasattr(getattr(self.model, "config", None), "model_type")

    # ONNX export and ONNX Runtime checks (imported only when used) ---------------------------
    def export_onnx(
        self,
        path: str | os.PathLike,
        example_input: Any,
        dynamic_batch: bool = True,
        fp32_path: str | os.PathLike | None = None,
        check_fusion: bool = True,
        opset: int = DEFAULT_OPSET,
        amx: bool | str = False,
        accuracy_level: int = 4,
        external_data: bool | None = None,
        progress: bool = True,
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
        ``external_data``: tensors in ``path.data`` beside the graph (ONNX external data),
        streamed layer by layer; None (default) = when the model has 2 GiB of weights or
        more (protobuf cannot hold one file past 2 GB); also for ``fp32_path``; with
        ``progress``, a progress bar per layer written there. The export's time goes into the
        summary's ``stage_seconds``.
        """
        from workbench.runtime.external_data import data_file_name
        from workbench.runtime.onnx_export import export_int8_onnx

        if not self.writes_files:  # a distributed job's other processes: rank 0 writes
            return Path(path)
        example_input = inference_inputs(example_input)  # the file never takes labels
        check_like_calibration(self.input_signature, example_input, self._free_sequence())
        if fp32_path is not None:
            check_fp32_path(path, fp32_path)
        existed = Path(path).exists() if isinstance(path, str | os.PathLike) else False
        created = missing_folders(Path(path)) if isinstance(path, str | os.PathLike) else []
        clock = StageClock()
        with guarded_export(path, opset), clock.stage("export_onnx"):
            written, _ = export_int8_onnx(
                self.model,
                path,
                example_input,
                dynamic_batch,
                opset,
                amx=amx,
                accuracy_level=accuracy_level,
                external_data=external_data,
                progress=progress,
            )
        clock.add_to(self.report.summary)
        if fp32_path is not None:
            try:
                self.export_fp32_onnx(fp32_path, example_input, dynamic_batch, opset, external_data)
            except BaseException:
                if not existed:  # a failed call leaves no file behind
                    written.unlink(missing_ok=True)
                    written.with_name(data_file_name(written)).unlink(missing_ok=True)
                    remove_empty_folders(created)
                raise
        if check_fusion:
            self.fusion(written)
        return written

    def export_fp32_onnx(
        self,
        path: str | os.PathLike,
        example_input: Any,
        dynamic_batch: bool = True,
        opset: int = DEFAULT_OPSET,
        external_data: bool | None = None,
    ) -> Path:
        """Write the FP32 reference (BatchNorm folded, no quantizers) as ONNX
        (``external_data`` as for ``export_onnx``)."""
        from workbench.runtime.onnx_export import export_fp32_onnx

        if not self.writes_files:
            return Path(path)
        example_input = inference_inputs(example_input)
        check_like_calibration(self.input_signature, example_input, self._free_sequence())
        with guarded_export(path, opset):
            return export_fp32_onnx(
                self.fp32_model, path, example_input, dynamic_batch, opset, external_data
            )

    def save_pretrained(self, path: str | os.PathLike, tokenizer: Any = None) -> Path:
        """Write a quantized ``transformers`` decoder as a standard Hugging Face GPTQ
        checkpoint folder: ``config.json`` with ``quantization_config`` (``quant_method``
        "gptq", ``bits``, ``group_size``, ``sym``, ``desc_act``), ``model.safetensors`` with
        packed ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` for every quantized Linear and
        the other tensors as they are, and ``tokenizer``'s files when one is given. Needs
        weight-only quantization with one 2/4/8-bit scheme (RTN, GPTQ with or without
        act-order, AdaRound); anything else raises ``ExportError`` naming what fits."""
        from workbench.runtime.gptq_checkpoint import write_gptq_checkpoint

        return write_gptq_checkpoint(self, path, tokenizer)

    def export_genai(
        self, path: str | os.PathLike, tokenizer: Any = None, accuracy_level: int = 4
    ) -> Path:
        """Write an ONNX Runtime GenAI model folder (``genai_config.json``, ``model.onnx`` +
        external data with a key/value cache, tokenizer files), made by onnxruntime-genai's
        own model builder from :meth:`save_pretrained`'s GPTQ checkpoint. LLaMA, Mistral and
        Qwen2 decoders; ``tokenizer`` is required (the folder carries it). ``accuracy_level``
        of the MatMulNBits nodes: 4 = int8 compute (fastest on x86), 1 = FP32 compute."""
        from workbench.runtime.genai_export import export_genai_folder

        return export_genai_folder(self, path, tokenizer, accuracy_level)

    def generation_benchmark(
        self,
        tokenizer: Any,
        prompts: Any,
        baselines: Any = ("builder fp32", "builder rtn int4"),
        new_tokens: int = 32,
        runs: int = 2,
        workdir: str | os.PathLike | None = None,
    ):
        """Prefill ms, decode tokens/s and file size on ONNX Runtime GenAI of this decoder's
        int4 folder (``export_genai``) beside onnxruntime-genai's own builds of the FP32
        weights (``baselines``: its FP32 and round-to-nearest int4), timed in one run, with the
        CPU line; the table goes into the report. Runs the builder once per folder.
        ``workdir`` keeps the folders (default: temporary)."""
        from workbench.runtime.genai_compare import compare_generation

        return compare_generation(self, tokenizer, prompts, baselines, new_tokens, runs, workdir)

    def generation_parity(self, folder: str | os.PathLike, prompts: Any, new_tokens: int = 32):
        """Greedy tokens of an ONNX Runtime GenAI folder against ``self.model``'s own greedy
        generation (``transformers`` ``generate``), prompt by prompt: the first position where
        they differ and the cosine of the two logits there (a ``GenerationParity``).
        ``prompts``: lists of token ids."""
        from workbench.runtime.genai_generation import generation_parity

        result = generation_parity(self.model, folder, prompts, new_tokens)
        self.report.extra_tables[result.REPORT_TITLE] = result.table
        return result

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


def check_fp32_path(path: str | os.PathLike, fp32_path: object) -> None:
    """``fp32_path`` must name another file than ``path`` (the FP32 model would replace the
    INT8 one) and not a folder (checked before anything is written)."""
    if not isinstance(fp32_path, str | os.PathLike):
        raise ConfigError(
            f"fp32_path must be a file path such as 'model_fp32.onnx', got {fp32_path!r}"
        )
    if Path(fp32_path).is_dir():
        raise ConfigError(
            f"fp32_path {str(fp32_path)!r} is a directory; pass a file path such as "
            "'model_fp32.onnx'"
        )
    if isinstance(path, str | os.PathLike) and _same_file(Path(path), Path(fp32_path)):
        raise ConfigError(
            f"fp32_path {str(fp32_path)!r} is the same file as path: the FP32 model would "
            "replace the INT8 one; give it its own name, e.g. 'model_fp32.onnx'"
        )


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def finished_result(
    model: nn.Module,
    fp32_model: nn.Module,
    report: Report,
    config: QuantConfig,
    plans: list[LayerPlan],
    method: str,
    first_batch: Any,
    job: Job | None,
    **fields: Any,
) -> QuantResult:
    """The QuantResult of a ``ptq`` / ``qat`` run. In a distributed job every process gets
    rank 0's report (and its training history), and only rank 0 writes files."""
    if job is not None:
        report = share_report(report, model, job)
    if getattr(report, "history", None) is not None:
        fields["history"] = report.history
    return QuantResult(
        model,
        fp32_model,
        report,
        config,
        plans,
        method=method,
        writes_files=job is None or job.writes_files,
        input_signature=input_signature(first_batch),
        **fields,
    )
