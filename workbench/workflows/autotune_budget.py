"""The budget of ``wb.autotune``: evaluations of ``eval_fn`` and / or wall-clock seconds."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from workbench.errors import ConfigError

DEFAULT_EVALUATIONS = 40


@dataclass(frozen=True)
class Budget:
    """How much the search may spend: ``evaluations`` of ``eval_fn`` (the FP32 one included)
    and / or wall-clock ``seconds``; None = no limit on that one."""

    evaluations: int | None = DEFAULT_EVALUATIONS
    seconds: float | None = None

    def describe(self) -> str:
        parts = []
        if self.evaluations is not None:
            parts.append(f"{self.evaluations} evaluations")
        if self.seconds is not None:
            parts.append(f"{self.seconds:g} s")
        return " or ".join(parts) or "no limit"


def resolve_budget(budget: Any) -> Budget:
    """``budget`` as a Budget: an int (evaluations), a dict with ``evaluations`` and / or
    ``seconds``, a Budget, or None (the default)."""
    fix = "pass budget=30 (evaluations of eval_fn) or budget={'evaluations': 30, 'seconds': 600}"
    if budget is None:
        return Budget()
    if isinstance(budget, Budget):
        parts = {"evaluations": budget.evaluations, "seconds": budget.seconds}
    elif isinstance(budget, Integral) and not isinstance(budget, bool):
        parts = {"evaluations": int(budget), "seconds": None}
    elif isinstance(budget, Mapping):
        unknown = [key for key in budget if key not in ("evaluations", "seconds")]
        if unknown or not budget:
            raise ConfigError(f"budget has unknown key {unknown[0]!r}; {fix}" if unknown else fix)
        parts = {"evaluations": budget.get("evaluations"), "seconds": budget.get("seconds")}
    else:
        raise ConfigError(f"budget must be an int or a dict, got {type(budget).__name__}; {fix}")
    evaluations, seconds = parts["evaluations"], parts["seconds"]
    if evaluations is not None and (
        isinstance(evaluations, bool) or not isinstance(evaluations, Integral) or evaluations < 2
    ):
        raise ConfigError(
            f"budget evaluations must be an int >= 2 (the FP32 model and one candidate), got "
            f"{evaluations!r}; {fix}"
        )
    if seconds is not None and (
        isinstance(seconds, bool)
        or not isinstance(seconds, Real)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise ConfigError(f"budget seconds must be a number > 0, got {seconds!r}; {fix}")
    return Budget(None if evaluations is None else int(evaluations), seconds)
