"""The user's ``eval_fn(model) -> float``: checked before anything runs, its value checked
at every call, so that a NaN or a string never reaches a report or a search."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch import nn

from workbench.errors import ConfigError, MetricError


def check_eval_fn(eval_fn: Any, caller: str, required: bool = False) -> None:
    """One clear error when ``eval_fn`` is not a callable (or missing where ``caller`` needs
    it), before calibration runs."""
    if eval_fn is None:
        if required:
            raise ConfigError(
                f"{caller} needs eval_fn(model) -> float, higher is better; pass e.g. "
                "eval_fn=lambda m: accuracy(m, test_x, test_y)"
            )
        return
    if not callable(eval_fn):
        raise ConfigError(
            f"eval_fn must be a function eval_fn(model) -> float, got {type(eval_fn).__name__}; "
            "pass the function itself, not its value"
        )


def measure_metric(
    eval_fn: Callable[[nn.Module], Any], model: nn.Module, which: str = "the quantized model"
) -> float:
    """``eval_fn(model)`` as a float; a ``MetricError`` naming ``which`` model when it is not
    one finite number (a 1-element tensor or a numpy scalar counts as a number)."""
    value = eval_fn(model)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        if hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # numpy scalar
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real):
            raise MetricError(
                f"eval_fn returned {type(value).__name__} {_short(value)} for {which}; "
                "make it return one number (higher is better), e.g. the accuracy as a float"
            )
    number = float(value)
    if not math.isfinite(number):
        raise MetricError(
            f"eval_fn returned {number} for {which}; a metric must be a finite number "
            "(check that eval_fn's data and its arithmetic give a value, e.g. no 0/0)"
        )
    return number


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_search(eval_fn: Any, max_drop: Any, caller: str) -> None:
    """The options of a mixed-precision search (``max_drop`` and the ``eval_fn`` it is a drop
    of), checked in this one place for the API, the magic and the panel."""
    if eval_fn is None:
        raise ConfigError(
            f"{caller} needs eval_fn(model) -> float (higher is better): max_drop is a drop "
            "of its metric; pass eval_fn"
        )
    check_eval_fn(eval_fn, caller)
    if isinstance(max_drop, bool) or not isinstance(max_drop, Real):
        raise ConfigError(
            f"max_drop must be a number >= 0 (a drop of the eval_fn metric), got "
            f"{type(max_drop).__name__} {max_drop!r}; pass e.g. max_drop=0.5"
        )
    if not math.isfinite(max_drop) or max_drop < 0:
        raise ConfigError(
            f"max_drop must be a finite number >= 0 (a drop of the eval_fn metric), got "
            f"{max_drop}; pass e.g. max_drop=0.5"
        )
