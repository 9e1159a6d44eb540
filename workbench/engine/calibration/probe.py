"""The probe batch of a large model: the first tokens of its first batch.

Preparing a model runs its first batch through it a few times: to find the layers whose input
is computed from weights alone, to check that the quantized stand-ins change nothing
(quantizers off), and, for configs without activation calibration, to find the layers the
model calls. None of these depends on how long a sequence is, while each pass over a large
model costs a forward; so a model of ``PROBE_MODEL_BYTES`` or more runs them on the first
``PROBE_TOKENS`` tokens of its first batch when that batch is token ids (integer tensors of one
``[batch, tokens]`` shape, as a tokenizer's ``input_ids`` and ``attention_mask``). Any other
batch, and every batch of a smaller model, is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

PROBE_MODEL_BYTES = 1024**3
PROBE_TOKENS = 8


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (in dicts, lists and tuples)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)([map_tensors(v, fn) for v in value])
    return value


def probe_batch(batch: Any, model_bytes: int) -> Any:
    """The first ``PROBE_TOKENS`` tokens of ``batch`` for a model of ``model_bytes`` bytes of
    weights at or above ``PROBE_MODEL_BYTES`` whose batch is token ids; else ``batch``."""
    if model_bytes < PROBE_MODEL_BYTES:
        return batch
    return first_tokens(batch, PROBE_TOKENS)


def first_tokens(batch: Any, tokens: int) -> Any:
    """The first ``tokens`` tokens of a batch of token ids (every tensor in it an integer
    ``[batch, length]`` tensor of one shape, longer than ``tokens``); else ``batch`` itself."""
    tensors = [leaf for leaf in tree_flatten(batch)[0] if isinstance(leaf, torch.Tensor)]
    if not tensors or any(
        tensor.dim() != 2 or tensor.is_floating_point() or tensor.shape != tensors[0].shape
        for tensor in tensors
    ):
        return batch
    if tensors[0].shape[1] <= tokens:
        return batch
    return map_tensors(batch, lambda tensor: tensor[:, :tokens])
