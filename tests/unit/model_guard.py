"""One check that a public function left the user's model and data as they were.

``Snapshot(model, *data)`` records the model's state dict (parameters and buffers, by value),
every submodule's ``training`` flag, every parameter's ``requires_grad``, the hooks and the
parametrizations, and a copy of every tensor found in ``data`` (tensors, lists, tuples, dicts);
``assert_unchanged()`` compares them after the call. ``untouched(model, *data)`` wraps a call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [t for value in tree.values() for t in _tensors(value)]
    if isinstance(tree, list | tuple):
        return [t for value in tree for t in _tensors(value)]
    return []


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal in shape, dtype, device and value (NaN equal to NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_meta:
        return True
    if a.is_floating_point():
        return bool(torch.equal(torch.nan_to_num(a, nan=1234.5), torch.nan_to_num(b, nan=1234.5)))
    return bool(torch.equal(a, b))


class Snapshot:
    """What a model and its data hold now, to compare after a call."""

    def __init__(self, model: Any, *data: Any) -> None:
        self.model = model
        self.is_module = isinstance(model, nn.Module)
        if self.is_module:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.modules = list(model.named_modules())
            self.training = [module.training for _, module in self.modules]
            self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
            self.hooks = [_hook_count(module) for _, module in self.modules]
            self.class_names = [type(module).__name__ for _, module in self.modules]
        self.data = [(t, t.detach().clone()) for t in _tensors(list(data))]

    def assert_unchanged(self) -> None:
        if self.is_module:
            model = self.model
            state = model.state_dict()
            assert state.keys() == self.state.keys(), "the model's state dict changed keys"
            for key, before in self.state.items():
                assert _same(state[key], before), f"the model's {key!r} changed"
            modules = list(model.named_modules())
            assert [n for n, _ in modules] == [n for n, _ in self.modules], "modules swapped"
            assert [type(m).__name__ for _, m in modules] == self.class_names, "modules swapped"
            for (name, module), training in zip(modules, self.training, strict=True):
                assert module.training == training, f"{name or 'model'}.training changed"
            for name, param in model.named_parameters():
                assert param.requires_grad == self.requires_grad[name], f"{name}.requires_grad"
            assert [_hook_count(m) for _, m in modules] == self.hooks, "hooks left on the model"
        for original, before in self.data:
            assert _same(original, before), "the user's data changed"


def _hook_count(module: nn.Module) -> int:
    return (
        len(module._forward_hooks)
        + len(module._forward_pre_hooks)
        + len(module._backward_hooks)
        + len(getattr(module, "_forward_hooks_with_kwargs", {}))
    )


@contextlib.contextmanager
def untouched(model: Any, *data: Any) -> Iterator[Snapshot]:
    """Assert that the body leaves ``model`` and ``data`` as they were, also when it raises."""
    snapshot = Snapshot(model, *data)
    try:
        yield snapshot
    finally:
        snapshot.assert_unchanged()
