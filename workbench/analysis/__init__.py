"""Per-layer error, storage accounting, and the Report."""

from workbench.analysis.metrics import ErrorAccumulator, cosine, sqnr_db
from workbench.analysis.report import Report

__all__ = ["ErrorAccumulator", "Report", "cosine", "sqnr_db"]
