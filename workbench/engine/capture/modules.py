"""Module utilities: find and replace submodules of a model by their dotted names, and
remove the hooks a pass installed.

Every transform of the engine (quantizer insertion, BatchNorm folding, live conv-BN during QAT,
mixed precision, the export's stand-ins) swaps modules by name; these are the only functions
that do it. ``ROOT_NAME`` names the model itself (a model that is one single layer).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
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


def shared_copy(model: nn.Module, share_buffers: bool = True) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters (and buffers, unless
    ``share_buffers`` is False: a forward in training mode updates BatchNorm's statistics in
    place) as the same tensor objects: modules can be swapped, added or removed in the copy
    without touching ``model``, at no memory cost. Writing into a shared tensor writes into
    ``model``'s: code working on the copy takes a tensor through ``writable`` before writing
    into it. A module that keeps derived state of its tensors (a weight quantizer's codes)
    shares it too (``share_kept_state_of``)."""
    tensors = [*model.parameters(), *(model.buffers() if share_buffers else ())]
    memo = {id(tensor): tensor for tensor in tensors}
    for tensor in tensors:
        _SHARED[id(tensor)] = tensor
    copied = copy.deepcopy(model, memo)
    originals = dict(model.named_modules())
    for name, module in copied.named_modules():
        source = originals.get(name)
        share = getattr(module, "share_kept_state_of", None)
        if share is not None and type(source) is type(module):
            share(source)
    return copied


# tensors that a ``shared_copy`` shares with the model it was made from: code that writes into
# a module's tensor in place takes it through ``writable`` first
_SHARED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def writable(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module``'s parameter or buffer ``name``, ready to be written in place: when it is
    shared with another model (``shared_copy``: the user's), ``module`` gets its own copy of
    it first, so that the other model never changes. Returns the tensor to write into."""
    value = getattr(module, name)
    if value is None or _SHARED.get(id(value)) is not value:
        return value
    with torch.no_grad():
        owned = value.detach().clone()
    if isinstance(value, nn.Parameter):
        owned = nn.Parameter(owned, requires_grad=value.requires_grad)
    setattr(module, name, owned)
    return owned


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (each tensor counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
