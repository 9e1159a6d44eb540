"""Calibration / training data: accept what users have, run it through a model.

A batch may be a tensor (``model(x)``), a tuple / list whose first item is the input
(``(inputs, targets)`` as a DataLoader of a TensorDataset yields), or a dict of keyword inputs
(``model(**batch)``, e.g. a tokenizer's output).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch
from torch import nn

from workbench.errors import CalibrationError, WorkbenchError


def iter_batches(
    data: Any,
    max_batches: int | None = None,
    what: str = "calib_data",
    limit_name: str = "num_batches",
) -> Iterator:
    """Batches from a DataLoader, an iterable of batches, or a single tensor, at most
    ``max_batches`` (the caller's option ``limit_name``, checked now, before any batch)."""
    if max_batches is not None and max_batches < 1:
        raise CalibrationError(
            f"{limit_name} must be >= 1, got {max_batches}; pass a positive number of batches "
            "or None to use them all"
        )
    return _checked_batches(data, max_batches, what)


def _checked_batches(data: Any, max_batches: int | None, what: str) -> Iterator:
    if data is None:
        raise CalibrationError(f"{what} is None; pass a DataLoader or a list of input tensors")
    if isinstance(data, torch.Tensor):
        batches: Iterable = [data]
    elif isinstance(data, Mapping):  # one batch of keyword inputs (a tokenizer's BatchEncoding)
        batches = [data]
    elif isinstance(data, Iterable):
        batches = data
    else:
        raise CalibrationError(
            f"{what} of type {type(data).__name__} is not iterable; "
            "pass a DataLoader, a list of input tensors or one tensor"
        )
    count = 0
    for batch in islice(batches, max_batches):
        if _is_empty(batch):
            raise CalibrationError(
                f"batch {count} of {what} holds 0 samples; pass batches with at least one sample"
            )
        count += 1
        yield batch
    if count == 0:
        raise CalibrationError(
            f"{what} yielded 0 batches; pass a DataLoader or a list of input tensors"
        )


def _is_empty(batch: Any) -> bool:
    if isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()), None)
    return isinstance(batch, torch.Tensor) and batch.numel() == 0


def model_inputs(batch: Any) -> tuple[tuple, dict]:
    """Split a batch into ``(args, kwargs)`` for the model."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, list | tuple) and batch:
        first = batch[0]
        if isinstance(first, Mapping):
            return (), dict(first)
        return (first,), {}
    raise CalibrationError(
        f"cannot read a model input from a batch of type {type(batch).__name__}; "
        "yield tensors, (inputs, targets) tuples or dicts of keyword inputs"
    )


def batch_size(batch: Any) -> int:
    args, kwargs = model_inputs(batch)
    first = args[0] if args else next(iter(kwargs.values()))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def run_model(model: nn.Module, batch: Any, index: int = 0, what: str = "calib_data") -> Any:
    """Run one batch through ``model``; a failure becomes one error naming the batch."""
    args, kwargs = model_inputs(batch)
    try:
        return model(*args, **kwargs)
    except WorkbenchError:
        raise  # already one clear sentence (a NaN activation, an observer's complaint)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(
            f"batch {index} of {what} could not run through the model ({first_line}); "
            "pass batches shaped like the model's input"
        ) from exc


def output_tensor(output: Any) -> torch.Tensor | None:
    """The main tensor of a model output (a tensor, the first of a tuple, or
    ``last_hidden_state`` / ``logits`` of a transformers ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, dict):
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
    if isinstance(output, list | tuple):
        for value in output:
            found = output_tensor(value)
            if found is not None:
                return found
    return None
