"""The SQNR bands every view shares: the report's cells and chart, the panel's plots.

Below ``SQNR_POOR_DB`` a layer's output is poor (red), from there to ``SQNR_GOOD_DB`` fair
(amber), above good (green). The JupyterLab renderer holds the same two numbers in
``extension/src/format.ts`` (a unit test compares them).
"""

from __future__ import annotations

import math

SQNR_POOR_DB = 20.0
SQNR_GOOD_DB = 30.0
BAND_COLORS = {"poor": "#d62728", "fair": "#f0a020", "good": "#2ca02c", "fp32": "#9e9e9e"}


def sqnr_band(sqnr_db: float | None) -> str | None:
    """``"poor"``, ``"fair"`` or ``"good"``; None when there is no finite value (an exact
    layer's infinite SQNR counts as good)."""
    if sqnr_db is None or (isinstance(sqnr_db, float) and math.isnan(sqnr_db)):
        return None
    if sqnr_db < SQNR_POOR_DB:
        return "poor"
    if sqnr_db < SQNR_GOOD_DB:
        return "fair"
    return "good"
