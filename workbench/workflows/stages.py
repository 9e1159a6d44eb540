"""The time of each stage of a workflow, the threads it ran on and the process's peak memory,
for the summary."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from workbench.engine.free_cpus import threads_on_free_cpus


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB


class StageClock:
    """Wall time per named stage (``with clock.stage("calibration"): ...``). Each stage runs
    torch on the CPUs other processes leave free (``engine/free_cpus.py``: on a busy machine
    fewer threads are many times faster) and records the thread count it used."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.threads: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with threads_on_free_cpus() as threads:
                self.threads[name] = min(threads, self.threads.get(name, threads))
                yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            release_freed_memory()

    def add_to(self, summary: dict) -> None:
        """``stage_seconds``, ``stage_threads`` (torch's threads in each stage, below
        ``torch_threads`` where other processes kept CPUs busy) and ``peak_rss_bytes`` (the
        process's peak up to now, what ran before the workflow included) in a summary."""
        stages = dict(summary.get("stage_seconds") or {})
        stages.update({name: round(value, 3) for name, value in self.seconds.items()})
        summary["stage_seconds"] = stages
        summary["stage_threads"] = {**(summary.get("stage_threads") or {}), **self.threads}
        summary["torch_threads"] = torch.get_num_threads()
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
