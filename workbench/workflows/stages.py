"""The time of each stage of a workflow and the process's peak memory, for the summary."""

from __future__ import annotations

import ctypes
import ctypes.util
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
            release_freed_memory()

    def add_to(self, summary: dict) -> None:
        """``stage_seconds`` and ``peak_rss_bytes`` (the process's peak up to now, what ran
        before the workflow included) in a report's summary."""
        stages = dict(summary.get("stage_seconds") or {})
        stages.update({name: round(value, 3) for name, value in self.seconds.items()})
        summary["stage_seconds"] = stages
        summary["peak_rss_bytes"] = peak_rss_bytes()


def release_freed_memory() -> None:
    """Give the memory freed by a stage back to the OS (``malloc_trim`` with glibc): the
    temporaries of one stage then do not raise the resident size of the next."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim
        pass
