"""An ONNX Runtime GenAI model folder, made by ``onnxruntime-genai``'s own model builder.

``QuantResult.export_genai`` writes the quantized decoder as a Hugging Face GPTQ checkpoint
(``runtime.gptq_checkpoint``) and hands it to the builder
(``python -m onnxruntime_genai.models.builder -i CHECKPOINT -o OUT -p int4 -e cpu``), whose
``loaders/gptq.py`` repacks the codes into ``MatMulNBits`` and whose family builders write the
graph with a key/value cache and ``GroupQueryAttention``: ``genai_config.json``,
``model.onnx`` + ``model.onnx.data`` and the tokenizer files. We write no graph of our own.

The builder runs in a child process: it puts its own folder on ``sys.path`` (its modules
``builders``, ``quantization``... would shadow others of those names) and prints progress.
An LM head kept FP32 is kept FP32 (``nodes_to_exclude=/lm_head/MatMul``), else the builder's
``int4`` pass would round it to nearest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from workbench.errors import ExportError, MissingDependencyError

# Families whose checkpoints name their projections as LLaMA does (q/k/v/o_proj,
# gate/up/down_proj), which the builder's GPTQ loader reads; checked here end to end for
# LLaMA, Mistral and Qwen2.
GENAI_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
INSTALL = 'pip install "quantization-workbench[genai]"  (onnxruntime-genai, onnx_ir)'


def require_genai() -> Any:
    """``onnxruntime_genai``, or a ``MissingDependencyError`` with the pip line."""
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise MissingDependencyError(f"ONNX Runtime GenAI is not installed: {INSTALL}") from exc
    return onnxruntime_genai


def check_genai_family(model: Any) -> str:
    """The model's architecture name when the builder takes it, else an ``ExportError``."""
    config = getattr(model, "config", None)
    names = list(getattr(config, "architectures", None) or []) or [type(model).__name__]
    if names[0] not in GENAI_FAMILIES:
        raise ExportError(
            f"export_genai builds ONNX Runtime GenAI folders for {', '.join(GENAI_FAMILIES)} "
            f"(LLaMA-style projection names the builder's GPTQ loader reads); the model is "
            f"{names[0]}: train or convert a LLaMA-architecture model, or use export_onnx"
        )
    return names[0]


def run_builder(
    checkpoint: Path, output: Path, cache: Path, extra_options: list[str], precision: str = "int4"
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(checkpoint),
        "-o",
        str(output),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    if extra_options:
        command += ["--extra_options", *extra_options]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(cache))


def export_genai_folder(
    result: Any, path: str | os.PathLike, tokenizer: Any, accuracy_level: int = 4
) -> Path:
    """Write ``result``'s model as an ONNX Runtime GenAI folder at ``path`` (atomically)."""
    from workbench.runtime.blockwise_export import check_accuracy_level
    from workbench.runtime.gptq_checkpoint import (
        _lm_head_name,
        atomic_folder,
        check_gptq_exportable,
        write_gptq_checkpoint,
    )

    require_genai()
    check_genai_family(result.model)
    check_accuracy_level(accuracy_level)
    check_gptq_exportable(result)
    if tokenizer is None:
        raise ExportError(
            "export_genai needs the model's tokenizer (ONNX Runtime GenAI folders carry one): "
            "pass tokenizer=... (a transformers tokenizer; PreTrainedTokenizerFast for a custom "
            "one)"
        )
    from workbench.engine.placement.layers import iter_quantized_layers

    layers = dict(iter_quantized_layers(result.model))
    head = _lm_head_name(result.model)
    head_quantized = head in layers and layers[head].weight_quantizer.enabled
    extra = [f"accuracy_level={accuracy_level}"]
    if not head_quantized:
        extra.append("nodes_to_exclude=/lm_head/MatMul")
    target = Path(path)
    with tempfile.TemporaryDirectory(prefix="workbench-genai-") as scratch:
        scratch_path = Path(scratch)
        checkpoint = scratch_path / "checkpoint"
        cache = scratch_path / "cache"
        cache.mkdir()
        # Our groups are contiguous runs of inputs (static groups) also with act-order, so
        # the builder's plain block layout holds them: no g_idx input on MatMulNBits.
        write_gptq_checkpoint(result, checkpoint, tokenizer, desc_act=False)
        with atomic_folder(target) as work:
            built = run_builder(checkpoint, work, cache, extra)
            if built.returncode != 0:
                tail = (built.stderr or built.stdout).strip().splitlines()[-3:]
                raise ExportError(
                    "onnxruntime-genai's model builder failed on the GPTQ checkpoint: "
                    + " | ".join(tail)
                )
            if not (work / "genai_config.json").exists():
                raise ExportError(
                    f"onnxruntime-genai's model builder wrote no genai_config.json in {target}"
                )
    return target
