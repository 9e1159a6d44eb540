"""Module utilities: find and replace submodules of a model by their dotted names, and
remove the hooks a pass installed.

Every transform of the engine (quantizer insertion, BatchNorm folding, live conv-BN during QAT,
mixed precision, the export's stand-ins) swaps modules by name; these are the only functions
that do it. ``ROOT_NAME`` names the model itself (a model that is one single layer).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.hooks import RemovableHandle

ROOT_NAME = "(model)"


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name``; ``(model)`` is the model itself."""
    return model if name == ROOT_NAME else model.get_submodule(name)


def find_submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The module called ``name``, or None when the model has no such module."""
    try:
        return get_layer(model, name)
    except AttributeError:
        return None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (a dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@contextmanager
def hooks_removed(handles: list[RemovableHandle]) -> Iterator[None]:
    """Remove every hook in ``handles`` when the block ends, also when it raises: a pass that
    watches a forward through hooks never leaves them on the user's (or the copied) model."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers (the same tensor
    objects): modules can be swapped, added or removed in the copy without touching ``model``,
    at no memory cost. Writing into a shared tensor writes into ``model``'s: code working on
    the copy replaces tensors (``module.weight = nn.Parameter(new)``), never edits them in
    place. A module that keeps derived state of its tensors (a weight quantizer's codes)
    shares it too (``share_kept_state_of``)."""
    memo = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    copied = copy.deepcopy(model, memo)
    originals = dict(model.named_modules())
    for name, module in copied.named_modules():
        source = originals.get(name)
        share = getattr(module, "share_kept_state_of", None)
        if share is not None and type(source) is type(module):
            share(source)
    return copied
