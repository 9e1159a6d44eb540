"""Look up the names a ``%quantize`` line gives in the notebook's namespace.

Only names and dotted attributes (``data.calib``) are accepted: a magic line is not a place
to evaluate code, and an expression is one cell away.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from IPython.core.error import UsageError
from torch import nn


def lookup(namespace: Mapping[str, Any], name: str, option: str) -> Any:
    """The value of ``name`` (``a`` or ``a.b.c``) in ``namespace``; ``option`` names the flag."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        raise UsageError(
            f"%quantize: {option} takes the name of a notebook variable (e.g. calib_loader or "
            f"data.calib), not {name!r}; assign the value to a variable first"
        )
    if parts[0] not in namespace:
        raise UsageError(
            f"%quantize: {option}: no variable named {parts[0]!r} in the notebook; "
            "define it first or check the spelling"
        )
    value = namespace[parts[0]]
    for index, part in enumerate(parts[1:], start=1):
        if not hasattr(value, part):
            owner = ".".join(parts[:index])
            raise UsageError(f"%quantize: {option}: {owner!r} has no attribute {part!r}")
        value = getattr(value, part)
    return value


def lookup_module(namespace: Mapping[str, Any], name: str) -> nn.Module:
    """The model called ``name``; anything but an ``nn.Module`` is a usage error."""
    value = lookup(namespace, name, "MODEL")
    if not isinstance(value, nn.Module):
        raise UsageError(
            f"%quantize: {name!r} is a {type(value).__name__}, not a torch.nn.Module; "
            "give the name of your model"
        )
    return value


def lookup_callable(namespace: Mapping[str, Any], name: str, option: str) -> Callable:
    """A function (or callable object such as ``nn.CrossEntropyLoss()``) called ``name``."""
    value = lookup(namespace, name, option)
    if not callable(value):
        raise UsageError(
            f"%quantize: {option} {name!r} is a {type(value).__name__}, not a function; "
            "give the name of a function or a callable object"
        )
    return value
