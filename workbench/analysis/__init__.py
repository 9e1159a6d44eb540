"""Per-layer error, storage accounting, and the Report."""

from workbench.analysis.report import Report
from workbench.core.metrics import ErrorAccumulator, cosine, sqnr_db

__all__ = ["ErrorAccumulator", "Report", "cosine", "sqnr_db"]
