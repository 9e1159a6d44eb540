"""Generation speed of a quantized decoder on ONNX Runtime GenAI beside the builder's own builds.

``compare_generation`` makes the folders and times them in one run
(``wb.generation_benchmark``): ours (``QuantResult.export_genai``: our GPTQ / RTN int4 codes
through onnxruntime-genai's builder) and, from the same FP32 weights, the builder's FP32 build
(what the user starts from) and its round-to-nearest int4 build (what the builder gives in one
line). Every folder is made by the builder, so the three differ only in their weights.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workbench.errors import ConfigError, ExportError

# label -> the builder's precision flag, for the builds made from the FP32 weights
BUILDER_BUILDS = {"builder fp32": "fp32", "builder rtn int4": "int4"}
REPORT_TITLE = "Generation on ONNX Runtime GenAI"


def write_fp32_checkpoint(model: Any, path: Path, tokenizer: Any) -> Path:
    """The FP32 decoder as a Hugging Face checkpoint (``config.json``, ``model.safetensors``,
    the tokenizer) without touching ``model`` (``save_pretrained`` would set its config's
    ``architectures``)."""
    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    config.use_cache = True
    tensors = dict(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # one storage with the embedding table
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    tokenizer.save_pretrained(str(path))
    return path


def build_from_fp32(checkpoint: Path, output: Path, cache: Path, precision: str) -> Path:
    """The builder's own ``precision`` build of the FP32 checkpoint."""
    from workbench.runtime.genai_export import run_builder

    built = run_builder(checkpoint, output, cache, [], precision)
    if built.returncode != 0 or not (output / "genai_config.json").exists():
        tail = (built.stderr or built.stdout).strip().splitlines()[-3:]
        raise ExportError(
            f"onnxruntime-genai's model builder failed on the FP32 checkpoint (-p {precision}): "
            + " | ".join(tail)
        )
    return output


def compare_generation(
    result: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    baselines: Sequence[str] = tuple(BUILDER_BUILDS),
    new_tokens: int = 32,
    runs: int = 2,
    workdir: str | os.PathLike | None = None,
):
    """Prefill ms and decode tokens/s of the builder's ``baselines`` builds of the FP32
    weights and of ``result``'s GenAI folder (last row), in one run (``GenerationBenchmark``).
    ``workdir``: keep the folders there (default: a temporary folder, removed)."""
    from workbench.runtime.genai_export import check_genai_family, require_genai
    from workbench.runtime.genai_generation import generation_benchmark

    require_genai()
    check_genai_family(result.model)
    unknown = [b for b in baselines if b not in BUILDER_BUILDS]
    if unknown or not baselines or isinstance(baselines, str):
        raise ConfigError(
            f"baselines must be one or more of {', '.join(map(repr, BUILDER_BUILDS))}; "
            f"got {baselines!r}"
        )
    if workdir is not None and Path(workdir).exists():
        raise ExportError(f"{workdir} exists; give a new folder for the GenAI folders")
    with tempfile.TemporaryDirectory(prefix="workbench-genai-compare-") as scratch:
        work = Path(workdir) if workdir is not None else Path(scratch) / "folders"
        try:
            folders = _make_folders(result, tokenizer, baselines, Path(scratch), work)
            bench = generation_benchmark(folders, prompts, new_tokens=new_tokens, runs=runs)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # a failed call leaves no folder behind
            raise
    result.report.extra_tables[REPORT_TITLE] = bench.table
    result.extras["generation_benchmark"] = bench
    return bench


def _make_folders(
    result: Any, tokenizer: Any, baselines: Sequence[str], scratch: Path, work: Path
) -> dict[str, Path]:
    ours = result.export_genai(work / "ours", tokenizer)  # checks the tokenizer first
    checkpoint = write_fp32_checkpoint(result.fp32_model, scratch / "fp32_checkpoint", tokenizer)
    folders = {}
    for label in baselines:
        cache = scratch / f"cache_{BUILDER_BUILDS[label]}"
        cache.mkdir()
        output = work / label.replace(" ", "_")
        folders[label] = build_from_fp32(checkpoint, output, cache, BUILDER_BUILDS[label])
    folders[f"ours {_weight_method(result)} int4"] = ours
    return folders


def _weight_method(result: Any) -> str:
    methods = {plan.weight_rounding for plan in result.plans if plan.weight_rounding}
    names = {"nearest": "rtn"}
    return "+".join(sorted(names.get(m, m) for m in methods)) or "rtn"
