"""One rule for a table cell that holds no value, shared by the report's HTML and JSON."""

from __future__ import annotations

from typing import Any


def is_missing(value: Any) -> bool:
    """True for None, NaN, ``pd.NA`` and ``pd.NaT``; False for any other value, including
    the containers and objects ``pd.isna`` cannot judge as one cell."""
    if value is None:
        return True
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False
