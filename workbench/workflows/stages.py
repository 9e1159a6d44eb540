"""The time of each stage of a workflow and the process's peak memory, for the summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB


class StageClock:
    """Wall time per named stage (``with clock.stage("calibration"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add_to(self, summary: dict) -> None:
        """``stage_seconds`` and ``peak_rss_bytes`` (the process's peak up to now, what ran
        before the workflow included) in a report's summary."""
        stages = dict(summary.get("stage_seconds") or {})
        stages.update({name: round(value, 3) for name, value in self.seconds.items()})
        summary["stage_seconds"] = stages
        summary["peak_rss_bytes"] = peak_rss_bytes()
