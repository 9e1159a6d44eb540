"""How the views print numbers: a unit on every one, at most 3 decimals, never ``1e+05``,
``NaN`` or ``<NA>`` (a missing value is an em dash). ``extension/src/format.ts`` is the
JupyterLab renderer's copy of the same rules."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from workbench.analysis.missing_values import is_missing

MISSING = "\u2014"
KIB = 1024
MIB = 1024 * 1024


def is_number(value: Any) -> bool:
    """A finite int or float (not bool, not NaN, not pandas' NA)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return hasattr(value, "item") and not isinstance(value, str) and is_number(value.item())
    return math.isfinite(value)


def format_bytes(value: Any) -> str:
    """``512 B``, ``1.5 KiB``, ``21.3 MiB`` (3 significant digits above 1 KiB)."""
    if not is_number(value):
        return MISSING
    value = float(value)
    if abs(value) < KIB:
        return f"{value:.0f} B"
    if abs(value) < MIB:
        return f"{significant(value / KIB)} KiB"
    return f"{significant(value / MIB)} MiB"


def significant(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits but at most 3 decimals, in positional
    notation (``103300`` stays ``103300``, ``0.000123`` becomes ``0.000123``)."""
    if not is_number(value):
        return MISSING
    value = float(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    if abs(value) >= 0.1:
        decimals = min(decimals, 3)
    # half up on the exact binary value, as the renderer's toLocaleString does
    rounded = Decimal(value).quantize(Decimal(1).scaleb(-decimals), ROUND_HALF_UP)
    text = f"{rounded:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_db(value: Any) -> str:
    """``23.4 dB``; an infinite SQNR (an exact layer) is ``exact``."""
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return "exact"
    if not is_number(value):
        return MISSING
    text = f"{float(value):.1f}"
    return f"{'0.0' if text == '-0.0' else text} dB"  # no "-0.0 dB" for -0.04


def format_ratio(value: Any) -> str:
    """``3.91x``."""
    return f"{float(value):.2f}\u00d7" if is_number(value) else MISSING


def format_cell(value: Any) -> str:
    """Any table cell: numbers positional with at most 3 decimals, missing as an em dash."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if is_number(value):
        number = value.item() if hasattr(value, "item") else value
        return f"{number:,}" if isinstance(number, int) else significant(number, 4)
    return MISSING if is_missing(value) else str(value)
