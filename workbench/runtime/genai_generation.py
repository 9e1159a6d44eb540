"""Generation on ONNX Runtime GenAI: speed of model folders side by side, and greedy tokens
against the simulated model.

``generation_benchmark`` times each folder's ``og.Generator`` on the same prompts in one run:
prefill (the prompt through the model, ``append_tokens``) and decode (each further token,
with the key/value cache). ``generation_parity`` compares a folder's greedy tokens with
``transformers``' greedy ``generate`` on the simulated model: both see the same prompt, and
while their tokens agree they see the same prefix, so at the first position where they
differ the two logits are comparable; their cosine says whether the difference is a near
tie flipped by kernel rounding (cosine near 1) or a real disagreement.

Both runs suppress the end-of-sequence token until ``new_tokens`` tokens are out
(``min_length`` / ``min_new_tokens``), so every prompt is compared over the same length.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from workbench.errors import ConfigError, ExportError


def _genai():
    from workbench.runtime.genai_export import require_genai

    return require_genai()


def load_genai_model(folder: str | os.PathLike) -> Any:
    og = _genai()
    path = Path(folder)
    if not (path / "genai_config.json").exists():
        raise ConfigError(
            f"{path} is not an ONNX Runtime GenAI folder (no genai_config.json); make one with "
            "QuantResult.export_genai(path, tokenizer) or onnxruntime-genai's model builder"
        )
    return og.Model(str(path))


def prompt_ids(model: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Each prompt as token ids: a string through the folder's tokenizer, ids as given."""
    if isinstance(prompts, str | bytes) or not len(prompts):
        raise ConfigError("prompts must be a non-empty list of strings or of token-id lists")
    tokenizer = None
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                tokenizer = _genai().Tokenizer(model)
            ids.append([int(t) for t in tokenizer.encode(prompt)])
        else:
            ids.append([int(t) for t in prompt])
        if not ids[-1]:
            raise ConfigError(f"prompt {prompt!r} has no tokens; give at least one token")
    return ids


@dataclass
class GreedyRun:
    tokens: list[int]
    logits: np.ndarray | None  # [new_tokens, vocab]: the logits each token was chosen from
    prefill_s: float
    decode_s: float


def greedy_genai(model: Any, ids: list[int], new_tokens: int, keep_logits: bool) -> GreedyRun:
    """``new_tokens`` greedy tokens after ``ids`` on an ``og.Model``."""
    og = _genai()
    params = og.GeneratorParams(model)
    length = len(ids) + new_tokens
    params.set_search_options(do_sample=False, max_length=length, min_length=length)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    prefill = time.perf_counter() - start
    logits = []
    start = time.perf_counter()
    while not generator.is_done():
        if keep_logits:
            logits.append(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1))
        generator.generate_next_token()
    decode = time.perf_counter() - start
    tokens = [int(t) for t in generator.get_sequence(0)][len(ids) :]
    return GreedyRun(tokens, np.stack(logits) if keep_logits else None, prefill, decode)


@torch.no_grad()
def greedy_torch(model: torch.nn.Module, ids: list[int], new_tokens: int) -> GreedyRun:
    """``transformers`` greedy ``generate`` on ``model`` (the simulation), with its logits."""
    input_ids = torch.tensor([ids], dtype=torch.long)
    start = time.perf_counter()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=_pad_id(model),
    )
    seconds = time.perf_counter() - start
    tokens = [int(t) for t in out.sequences[0, len(ids) :]]
    logits = torch.cat([step.float() for step in out.logits]).numpy()
    return GreedyRun(tokens, logits, 0.0, seconds)


def _pad_id(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for attribute in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, attribute, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


@dataclass
class GenerationParity:
    """One row per prompt: positions compared, first position where the tokens differ (None:
    none), share of positions before it, and the logits' cosine there (at the last position
    when they never differ)."""

    REPORT_TITLE = "Generation: ONNX Runtime GenAI vs simulation (greedy)"

    table: pd.DataFrame

    @property
    def agreement(self) -> float:
        """Share of all compared positions generated before the first difference."""
        return float(self.table["agreeing_positions"].sum() / self.table["positions"].sum())

    def summary_text(self) -> str:
        t = self.table
        differ = t["first_difference"].notna()
        text = (
            f"{len(t)} prompts, {int(t['positions'].iloc[0])} greedy tokens each: "
            f"{self.agreement:.0%} of positions agree before a first difference; "
            f"{int(differ.sum())} prompt(s) differ"
        )
        if differ.any():
            text += f", logits cosine there >= {t.loc[differ, 'cosine_there'].min():.5f}"
        return text

    def _repr_html_(self) -> str:
        return self.table.to_html(index=False)


def generation_parity(
    model: torch.nn.Module, folder: str | os.PathLike, prompts: Sequence[Any], new_tokens: int = 32
) -> GenerationParity:
    """Greedy tokens of the GenAI ``folder`` against ``model``'s own greedy ``generate``."""
    _check_new_tokens(new_tokens)
    genai_model = load_genai_model(folder)
    rows = []
    for index, ids in enumerate(prompt_ids(genai_model, prompts)):
        ours = greedy_torch(model, ids, new_tokens)
        theirs = greedy_genai(genai_model, ids, new_tokens, keep_logits=True)
        if ours.logits.shape[1] != theirs.logits.shape[1]:
            raise ExportError(
                f"the folder's logits have {theirs.logits.shape[1]} entries, the model's "
                f"{ours.logits.shape[1]}: {folder} was not made from this model"
            )
        pairs = zip(ours.tokens, theirs.tokens, strict=True)
        differ = [i for i, (a, b) in enumerate(pairs) if a != b]
        first = differ[0] if differ else None
        there = first if first is not None else new_tokens - 1
        rows.append(
            {
                "prompt": index,
                "prompt_tokens": len(ids),
                "positions": new_tokens,
                "first_difference": first,
                "agreeing_positions": first if first is not None else new_tokens,
                "cosine_there": _cosine(ours.logits[there], theirs.logits[there]),
                "min_cosine_before": min(
                    (_cosine(ours.logits[i], theirs.logits[i]) for i in range(there)),
                    default=float("nan"),
                ),
            }
        )
    table = pd.DataFrame(rows)
    table["first_difference"] = table["first_difference"].astype("Int64")
    return GenerationParity(table)


def _check_new_tokens(new_tokens: int) -> None:
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ConfigError(f"new_tokens must be an int >= 2, got {new_tokens!r}; e.g. 32")


@dataclass
class GenerationBenchmark:
    """One row per model folder: prefill ms (median over prompts and runs), decode tokens/s
    (tokens after the first over the time to generate them), file size; ``cpu`` the CPU line."""

    table: pd.DataFrame
    cpu: str

    def _repr_html_(self) -> str:
        return f"<p>{self.cpu}</p>" + self.table.to_html(index=False)

    def __repr__(self) -> str:
        return f"{self.cpu}\n{self.table.to_string(index=False)}"


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the folder's ONNX files (graph and external data)."""
    return sum(
        f.stat().st_size
        for f in Path(folder).iterdir()
        if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data")
    )


def generation_benchmark(
    folders: dict[str, str | os.PathLike] | Sequence[str | os.PathLike],
    prompts: Sequence[Any],
    new_tokens: int = 64,
    runs: int = 3,
    warmup: int = 1,
) -> GenerationBenchmark:
    """Prefill time and decode tokens/s of two or more ONNX Runtime GenAI folders, in one
    run, on the same prompts; the runs alternate between folders so load on the machine
    falls on all of them alike. ``folders``: ``{label: path}`` or paths (labelled by name)."""
    from workbench.runtime.cpu_features import machine_line

    _check_new_tokens(new_tokens)
    if isinstance(folders, str | os.PathLike):
        folders = [folders]
    labelled = (
        dict(folders) if isinstance(folders, dict) else {Path(f).name or str(f): f for f in folders}
    )
    if len(labelled) < 2:
        raise ConfigError(
            "generation_benchmark compares two or more folders (e.g. {'fp32': ..., "
            f"'int4': ...}}); got {len(labelled)}"
        )
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"runs must be an int >= 1, got {runs!r}")
    models = {label: load_genai_model(path) for label, path in labelled.items()}
    first = next(iter(models.values()))
    ids = prompt_ids(first, prompts)
    for model in models.values():
        for prompt in ids[:1]:
            for _ in range(warmup):
                greedy_genai(model, prompt, new_tokens, keep_logits=False)
    prefill: dict[str, list[float]] = {label: [] for label in models}
    decode: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(runs):
        for prompt in ids:
            for label, model in models.items():
                run = greedy_genai(model, prompt, new_tokens, keep_logits=False)
                prefill[label].append(run.prefill_s)
                decode[label].append((new_tokens - 1) / run.decode_s)
    rows = []
    for label, path in labelled.items():
        rows.append(
            {
                "model": label,
                "prefill_ms_p50": 1e3 * float(np.median(prefill[label])),
                "decode_tokens_per_s": float(np.median(decode[label])),
                "file_mb": folder_bytes(path) / 1e6,
            }
        )
    table = pd.DataFrame(rows)
    base = table["decode_tokens_per_s"].iloc[0]
    table["decode_vs_first"] = table["decode_tokens_per_s"] / base
    return GenerationBenchmark(table, machine_line())
