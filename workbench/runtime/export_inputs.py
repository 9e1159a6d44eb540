"""The example input of an export as the traced graph takes it, and the model's outputs as
the graph returns them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from workbench.engine.calibration.batches import model_inputs
from workbench.errors import ExportError


def flatten_outputs(output: Any, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of a model output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [(prefix, output)]
    items: list[tuple[str, Any]]
    if isinstance(output, dict) or hasattr(output, "keys"):
        items = [(str(key), output[key]) for key in output.keys()]  # noqa: SIM118
    elif isinstance(output, list | tuple):
        items = [(f"{prefix}_{i}", value) for i, value in enumerate(output)]
    else:
        return []
    flat: list[tuple[str, torch.Tensor]] = []
    for name, value in items:
        flat.extend(flatten_outputs(value, name))
    return flat


def export_inputs(example_input: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of an example input, read as ``torch.onnx.export`` reads it: a tensor
    is the one input, a dict the keyword inputs, a tuple / list the positional inputs (a dict
    as its last item: keyword inputs after them)."""
    if isinstance(example_input, list | tuple):
        items = list(example_input)
        kwargs = dict(items.pop()) if items and isinstance(items[-1], Mapping) else {}
        if not items and not kwargs:
            raise ExportError("example_input is an empty tuple; pass the model's input tensors")
        return tuple(items), kwargs
    return model_inputs(example_input)


def input_names(example_input: Any) -> tuple[tuple, list[str]]:
    """The positional tensors the exported graph takes, and their names."""
    args, kwargs = export_inputs(example_input)
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    names += list(kwargs)
    values = tuple(args) + tuple(kwargs.values())
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"example input {name!r} is a {type(value).__name__}, not a tensor; pass tensors "
                "(or a dict of tensors) as example_input"
            )
    return values, names


class Positional(nn.Module):
    """Calls ``model`` with the exported inputs and returns its output tensors as a tuple."""

    def __init__(self, model: nn.Module, arg_count: int, kwarg_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.arg_count = arg_count
        self.kwarg_names = kwarg_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = inputs[: self.arg_count]
        kwargs = dict(zip(self.kwarg_names, inputs[self.arg_count :], strict=True))
        return tuple(tensor for _, tensor in flatten_outputs(self.model(*args, **kwargs)))
