"""Exports run a ``transformers`` decoder with its key/value cache off.

A causal LM called with ``use_cache=True`` (its config's default) also builds a cache of every
layer's keys and values for the next token. The exported graph computes the logits of the
tokens it is given (a whole prompt, or one token with no history); the cache is not one of
its inputs or outputs, so building it would only trace dead work (and, with older
``transformers`` returning it as tensors, add outputs). ``use_cache`` is set to False on the
model's configs for the export and restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def kv_cache_off(model: nn.Module) -> Iterator[None]:
    """``config.use_cache = False`` on every ``transformers`` config of ``model`` while the
    block runs; each is restored after it, also when the block raises."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is True:
            configs[id(config)] = config
    try:
        for config in configs.values():
            config.use_cache = False
        yield
    finally:
        for config in configs.values():
            config.use_cache = True
