"""One copy of a stand-in's spec per call, for modules the model calls at several sites.

TorchScript's tracer fails with ``unordered_map::at`` when one tensor held by a non-tensor
argument of an autograd Function (a stand-in's spec: its dequantized weight, its scale)
reaches a second call of that Function: a shared ``nn.Linear`` called twice, or the input
quantizer in front of it. Copies made while tracing do not help (the tracer sees them made);
so the export counts each stand-in's calls in its dry run, before tracing, and gives every call
after the first a spec whose tensors are copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from workbench.engine.capture.modules import hooks_removed


class PerCallSpec(nn.Module):
    """A stand-in whose ``spec`` (a dataclass holding tensors) goes to an autograd Function."""

    spec: Any

    def call_spec(self) -> Any:
        """The spec for this call: ``spec`` itself unless the dry run saw several calls."""
        copies: list[Any] = getattr(self, "_call_specs", [])
        if not copies:
            return self.spec
        spec = copies[self._call_index % len(copies)]
        self._call_index += 1
        return spec


def _copied(spec: Any) -> Any:
    tensors = {
        field.name: value.clone()
        for field in dataclasses.fields(spec)
        if isinstance(value := getattr(spec, field.name), torch.Tensor)
    }
    return dataclasses.replace(spec, **tensors)


@contextmanager
def spec_copies_per_call(model: nn.Module) -> Iterator[None]:
    """Count each stand-in's calls while the block runs the model once; afterwards every
    stand-in called ``n > 1`` times holds ``n`` specs, one per call, in call order."""
    calls: dict[nn.Module, int] = {}

    def count(module: nn.Module, args: Any) -> None:
        calls[module] = calls.get(module, 0) + 1

    stand_ins = [module for module in model.modules() if isinstance(module, PerCallSpec)]
    handles = [module.register_forward_pre_hook(count) for module in stand_ins]
    with hooks_removed(handles):
        yield
    for module, count_of_calls in calls.items():
        # a stand-in whose calls differ (``specs_by_call``: one INT32 bias grid per call)
        base = getattr(module, "specs_by_call", None) or [module.spec]
        copies = [base[0], *(_copied(base[i % len(base)]) for i in range(1, count_of_calls))]
        module._call_specs = copies if count_of_calls > 1 else []
        module._call_index = 0
