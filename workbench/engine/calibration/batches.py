"""Calibration / training data: accept what users have, run it through a model.

The data is a DataLoader, an iterable of batches, one tensor (one batch), or one
``(X, y)`` tuple of inputs and targets with the same number of samples, ``y`` with fewer
dimensions (one batch, as a DataLoader of ``TensorDataset(X, y)`` would yield it whole;
``inputs_and_targets``).

A batch may be a tensor (``model(x)``), a tuple / list whose first item is the input
(``(inputs, targets)`` as a DataLoader of a TensorDataset yields), or a dict of keyword inputs
(``model(**batch)``, e.g. a tokenizer's output).

Models whose ``forward`` requires several positional inputs (``forward(ids, mask)``), with
n = the number of required positional parameters, one rule for calibration and training:

* ``((ids, mask), targets)``: a first item that is itself a tuple / list is the positional
  inputs (when ``forward`` takes more than one positional parameter);
* ``(ids, mask)`` or ``(ids, mask, targets)``: the first n items are the inputs and the item
  right after them, if any, the targets;
* ``({"input_ids": ..., "attention_mask": ...}, targets)`` or a dict: keyword inputs.

A batch with fewer than n items is one error naming the fix. Training batches also carry what
``loss_fn`` compares the output with: the targets as above (``batch[1]`` for single-input
models, as always), or the whole dict (``loss_fn(output, batch)``, e.g. one holding
``labels``); a flat tuple of n inputs with no targets, or with more than one item after them,
is one error (which item would be the targets is ambiguous).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import chain, islice
from numbers import Integral
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from workbench.engine.calibration.probe import map_tensors
from workbench.errors import CalibrationError, ConfigError, WorkbenchError, first_line


def iter_batches(
    data: Any,
    max_batches: int | None = None,
    what: str = "calib_data",
    limit_name: str = "num_batches",
) -> Iterator:
    """Batches from a DataLoader, an iterable of batches, or a single tensor, at most
    ``max_batches`` (the caller's option ``limit_name``, checked now, before any batch)."""
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, Integral)
    ):
        raise CalibrationError(
            f"{limit_name} must be an int or None, got {type(max_batches).__name__} "
            f"{max_batches!r}; pass e.g. {limit_name}=8"
        )
    if max_batches is not None and max_batches < 1:
        raise CalibrationError(
            f"{limit_name} must be >= 1, got {max_batches}; pass a positive number of batches "
            "or None to use them all"
        )
    return _checked_batches(data, max_batches, what)


def _checked_batches(data: Any, max_batches: int | None, what: str) -> Iterator:
    if data is None:
        raise CalibrationError(f"{what} is None; pass a DataLoader or a list of input tensors")
    if isinstance(data, torch.Tensor) or inputs_and_targets(data):
        batches: Iterable = [data]
    elif isinstance(data, Mapping):  # one batch of keyword inputs (a tokenizer's BatchEncoding)
        batches = [data]
    elif isinstance(data, Iterable):
        batches = data
    else:
        raise not_iterable(data, what, "a DataLoader, a list of input tensors or one tensor")
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


def inputs_and_targets(data: Any) -> bool:
    """Whether ``data`` is one ``(inputs, targets)`` pair of tensors, as ``wb.ptq(model, (X,
    y))`` passes a whole data set: a tuple of two tensors with the same number of samples, the
    second with fewer dimensions (labels ``[N]`` for inputs ``[N, ...]``; two batches of one
    model would have the same number). It is read as one batch, as a DataLoader's ``(x, y)``
    batch (the model sees ``X``), not as two batches."""
    if not (isinstance(data, tuple) and len(data) == 2):
        return False
    inputs, targets = data
    if not (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return False
    if inputs.dim() == 0 or targets.dim() == 0 or targets.dim() >= inputs.dim():
        return False
    return len(inputs) == len(targets)


def not_iterable(data: Any, what: str, expected: str) -> CalibrationError:
    """The error for data that cannot be iterated: ``expected`` names what to pass instead."""
    return CalibrationError(
        f"{what} of type {type(data).__name__} is not iterable; pass {expected}"
    )


def _is_empty(batch: Any) -> bool:
    if isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()), None)
    return isinstance(batch, torch.Tensor) and batch.numel() == 0


def _positional_parameters(model: nn.Module | None) -> list[inspect.Parameter] | None:
    """``model.forward``'s positional parameters (``None`` when they cannot be read); a
    DistributedDataParallel wrapper is read through to the model it wraps."""
    if model is None:
        return None
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in parameters if p.kind in kinds]


def required_positional_inputs(model: nn.Module | None) -> int:
    """How many positional parameters ``model.forward`` requires (1 when it cannot be read)."""
    parameters = _positional_parameters(model) or []
    required = [p for p in parameters if p.default is inspect.Parameter.empty]
    return max(1, len(required))


def _inputs_tuple_first(batch: Any, model: nn.Module | None) -> bool:
    """Whether ``batch`` is ``((inputs...), targets)``: its first item a tuple / list and the
    forward taking several positional parameters (a one-parameter forward gets it whole)."""
    if not (isinstance(batch, list | tuple) and batch and isinstance(batch[0], list | tuple)):
        return False
    return len(_positional_parameters(model) or []) > 1


def model_inputs(batch: Any, model: nn.Module | None = None) -> tuple[tuple, dict]:
    """Split a batch into ``(args, kwargs)`` for the model (the rule: module docstring). The
    tensors are copies: a model that changes its input in place must not change the user's
    data."""
    if isinstance(batch, torch.Tensor):
        return (_copy(batch),), {}
    if isinstance(batch, Mapping):
        return (), {key: _copy(value) for key, value in batch.items()}
    if isinstance(batch, list | tuple) and batch:
        first = batch[0]
        if isinstance(first, Mapping):
            return (), {key: _copy(value) for key, value in first.items()}
        count = required_positional_inputs(model)
        if _inputs_tuple_first(batch, model):
            if len(first) < count:
                raise CalibrationError(
                    f"the model's forward takes {count} positional inputs but a batch's inputs "
                    f"are a {type(first).__name__} of {len(first)} item(s); yield "
                    f"(({', '.join(['x'] * count)}), targets) with all {count} inputs"
                )
            return tuple(_copy(value) for value in first), {}
        if count == 1:
            return (_copy(first),), {}
        if len(batch) < count:
            raise CalibrationError(
                f"the model's forward takes {count} positional inputs but a batch is a "
                f"{type(batch).__name__} of {len(batch)} item(s); yield tuples of the {count} "
                "inputs (optionally followed by the targets) or dicts of keyword inputs"
            )
        return tuple(_copy(value) for value in batch[:count]), {}
    raise CalibrationError(
        f"cannot read a model input from a batch of type {type(batch).__name__}; "
        "yield tensors, (inputs, targets) tuples or dicts of keyword inputs"
    )


# keyword inputs of transformers' forwards that only training gives: with them the output holds
# a loss. An exported model, a benchmark and a parity check take the inference inputs only.
TRAINING_ONLY_INPUTS = frozenset(
    {
        "labels",
        "label",
        "start_positions",
        "end_positions",
        "next_sentence_label",
        "sentence_order_label",
        "mc_labels",
        "return_loss",
    }
)


def inference_inputs(batch: Any) -> Any:
    """``batch`` without its training-only keyword inputs (``labels``, ...): a dict, or a
    tuple / list whose first item is the dict of keyword inputs. Anything else as it is."""
    if isinstance(batch, Mapping):
        return {key: value for key, value in batch.items() if key not in TRAINING_ONLY_INPUTS}
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Mapping):
        return type(batch)([inference_inputs(batch[0]), *batch[1:]])
    return batch


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def batch_size(batch: Any) -> int:
    args, kwargs = model_inputs(batch)
    first = args[0] if args else next(iter(kwargs.values()))
    while isinstance(first, list | tuple) and first:  # ((ids, mask), targets)
        first = first[0]
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def first_samples(batch: Any, count: int = 2) -> Any:
    """The first ``count`` samples of a batch: tracing a data flow needs no more, and a trace
    keeps every intermediate tensor alive. Every tensor with the batch's leading size is cut
    (``(ids, mask)`` and ``((ids, mask), labels)`` alike)."""
    leaves, _ = tree_flatten(batch)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        return batch
    size = tensors[0].shape[0]
    return map_tensors(
        batch, lambda value: value[:count] if value.dim() > 0 and value.shape[0] == size else value
    )


def run_model(model: nn.Module, batch: Any, index: int = 0, what: str = "calib_data") -> Any:
    """Run one batch through ``model``; a failure becomes one error naming the batch."""
    args, kwargs = model_inputs(batch, model)
    try:
        return model(*args, **kwargs)
    except WorkbenchError:
        raise  # already one clear sentence (a NaN activation, an observer's complaint)
    except Exception as exc:  # the model's own error (shape, KeyError, assert), in one line
        doubles = any(
            isinstance(t, torch.Tensor) and t.dtype == torch.float64
            for t in tree_flatten((args, kwargs))[0]
        )
        fix = (
            f"{what} is float64 and the model float32: pass float32 data (x.float())"
            if doubles
            else "pass batches shaped like the model's input"
        )
        raise CalibrationError(
            f"batch {index} of {what} could not run through the model "
            f"({type(exc).__name__}: {first_line(exc)}); {fix}"
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


# training batches -------------------------------------------------------------------------------
TRAIN_DATA_EXPECTED = "a DataLoader or a list of (inputs, targets) batches"


def loss_target(batch: Any, model: nn.Module | None = None) -> Any:
    """What ``loss_fn`` receives next to the output (the rule: module docstring): the targets
    of ``(inputs, targets)``, ``((ids, mask), targets)`` or ``(ids, mask, targets)`` for a
    ``forward(ids, mask)``, or the whole batch when it is a dict (``loss_fn(output, batch)``)."""
    if isinstance(batch, Mapping):
        return batch
    count = required_positional_inputs(model)
    flat = (
        isinstance(batch, list | tuple)
        and count > 1
        and not isinstance(batch[0], Mapping)
        and not _inputs_tuple_first(batch, model)
    )
    if flat:
        if len(batch) == count + 1:
            return batch[count]
        example = ", ".join(f"x{i}" for i in range(count))
        raise CalibrationError(
            f"the model's forward takes {count} positional inputs and a train_data batch is a "
            f"{_describe(batch)}: which item is the targets is ambiguous; yield "
            f"(({example}), targets) or ({example}, targets) batches, or dicts for "
            "loss_fn(output, batch)"
        )
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[1]
    raise CalibrationError(
        f"train_data yielded a batch of type {_describe(batch)}; yield (inputs, targets) "
        "tuples (e.g. a DataLoader of a TensorDataset(x, y)) or dicts for loss_fn(output, batch)"
    )


def _describe(batch: Any) -> str:
    if isinstance(batch, list | tuple):
        return f"{type(batch).__name__} of {len(batch)} item(s)"
    return type(batch).__name__


def move_batch(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (tuples, lists, dicts)."""
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)({k: move_batch(v, device) for k, v in batch.items()})
    if isinstance(batch, list | tuple):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def forward_loss(model: nn.Module, batch: Any, loss_fn: Callable) -> torch.Tensor:
    """``loss_fn(model(inputs), target)`` for one (already moved) batch."""
    args, kwargs = model_inputs(batch, model)
    output = model(*args, **kwargs)
    return loss_fn(output, loss_target(batch, model))


def epoch_batches(train_data: Any, first_batches: list[Any], epochs: int) -> Callable[[], Iterator]:
    """A function returning one epoch's batches. A one-shot iterator (a generator) can feed
    one epoch only: the batches already taken for calibration are chained back in front."""
    if isinstance(train_data, dict):
        return lambda: iter([train_data])
    if not isinstance(train_data, Iterable):
        raise not_iterable(train_data, "train_data", TRAIN_DATA_EXPECTED)
    if isinstance(train_data, Iterator):
        if epochs > 1:
            raise ConfigError(
                "train_data is a one-shot iterator and cannot be read again for a second "
                "epoch; pass a DataLoader or a list of batches, or epochs=1"
            )
        pending = [chain(first_batches, train_data)]
        return lambda: pending.pop() if pending else iter(())
    return lambda: iter(train_data)


def take_first_batches(train_data: Any, count: int) -> list[Any]:
    """The first ``count`` batches of ``train_data`` (calibration, and the loss check)."""
    if isinstance(train_data, torch.Tensor):
        raise CalibrationError(
            "train_data is a single tensor, which has no targets for loss_fn; pass a "
            "DataLoader of (inputs, targets), e.g. DataLoader(TensorDataset(x, y))"
        )
    if inputs_and_targets(train_data):  # calibration reads it as one batch; training cannot
        raise CalibrationError(
            "train_data is one (inputs, targets) pair of tensors: training on it would take one "
            "step per epoch; pass mini-batches: DataLoader(TensorDataset(X, y), batch_size=32, "
            "shuffle=True)"
        )
    if isinstance(train_data, dict):
        return [train_data]
    if not isinstance(train_data, Iterable):
        raise not_iterable(train_data, "train_data", TRAIN_DATA_EXPECTED)
    batches = []
    for batch in train_data:
        batches.append(batch)
        if len(batches) >= count:
            break
    if not batches:
        raise CalibrationError(
            "train_data yielded 0 batches; pass a DataLoader or a non-empty list of "
            "(inputs, targets) batches"
        )
    return batches
