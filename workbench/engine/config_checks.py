"""QuantConfig's checks of its per-layer fields: ``exclude`` (layer names / glob patterns) and
``overrides`` (pattern -> weight / activation schemes), each one clear error naming the fix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from workbench.core.scheme import Scheme
from workbench.errors import ConfigError


def exclude_patterns(exclude: object) -> tuple[str, ...]:
    """``exclude`` as a tuple of layer names / glob patterns (one string is one pattern)."""
    if isinstance(exclude, str):
        return (exclude,)
    fix = "pass layer names or glob patterns, e.g. exclude=('fc2', 'encoder.*.dense'), or ()"
    if exclude is None or not isinstance(exclude, Iterable):
        raise ConfigError(f"exclude must be a tuple of layer names, got {exclude!r}; {fix}")
    patterns = tuple(exclude)
    wrong = [p for p in patterns if not isinstance(p, str)]
    if wrong:
        raise ConfigError(f"exclude holds {wrong[0]!r}, not a layer name; {fix}")
    return patterns


OVERRIDE_KEYS = ("weight", "activation")


def override_table(overrides: object) -> dict[str, dict[str, Scheme | None]]:
    """``overrides`` checked and copied: pattern -> {"weight": Scheme, "activation": ...}."""
    example = 'e.g. overrides={"fc2": {"weight": wb.Scheme(8, True, True)}}'
    if not isinstance(overrides, Mapping):
        raise ConfigError(
            f"overrides must be a dict of layer name or pattern -> schemes, got "
            f"{type(overrides).__name__}; {example}"
        )
    table: dict[str, dict[str, Scheme | None]] = {}
    for pattern, override in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(
                f"overrides key {pattern!r} is not a layer name or pattern; {example}"
            )
        if not isinstance(override, Mapping):
            raise ConfigError(
                f"overrides[{pattern!r}] must be a dict with 'weight' and / or 'activation', "
                f"got {type(override).__name__}; {example}"
            )
        unknown = [key for key in override if key not in OVERRIDE_KEYS]
        if unknown:
            raise ConfigError(
                f"overrides[{pattern!r}] has unknown key {unknown[0]!r}; use 'weight' and / or "
                f"'activation' (to keep the layer FP32, add it to exclude)"
            )
        if "weight" in override:
            weight = override["weight"]
            if not isinstance(weight, Scheme):
                raise ConfigError(
                    f"overrides[{pattern!r}]['weight'] must be a Scheme, got {weight!r}; "
                    f"{example} (to keep the layer FP32, add it to exclude)"
                )
            if weight.per_channel and weight.axis != 0:
                raise ConfigError(
                    f"overrides[{pattern!r}]['weight'] is per-channel on axis {weight.axis}; "
                    "per-channel weights use axis=0: wb.Scheme(..., per_channel=True, axis=0)"
                )
        if "activation" in override:
            activation = override["activation"]
            if activation is not None and not isinstance(activation, Scheme):
                raise ConfigError(
                    f"overrides[{pattern!r}]['activation'] must be a Scheme or None (FP32 "
                    f"input), got {activation!r}"
                )
            if activation is not None and activation.per_channel:
                raise ConfigError(
                    f"overrides[{pattern!r}]['activation'] is per-channel; activations are "
                    "per-tensor: pass wb.Scheme(bits, symmetric, per_channel=False)"
                )
        table[pattern] = dict(override)
    return table
