"""Latency of ONNX files on ONNX Runtime CPU, each timed beside one FP32 reference file.

Each file is timed in alternating blocks with the FP32 file (``benchmark.time_sessions``):
the p50 of each, so that a search's table gives every candidate's speed against FP32 from one
run. On a loaded machine the FP32 file's p50 swings more than the integer kernels' do, so a
search compares the files' own p50s, and times its finalists side by side in one run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.runtime.benchmark import time_sessions
from workbench.runtime.ort_session import make_session, session_feeds

FP32 = "fp32"


@dataclass(frozen=True)
class Timing:
    """p50 latency of a file and of the FP32 file in the same run (ms)."""

    latency_ms: float
    fp32_latency_ms: float

    @property
    def latency_vs_fp32(self) -> float:
        return self.latency_ms / self.fp32_latency_ms


class SideBySideLatency:
    """Times files against ``fp32_path`` on ``example_input`` (``threads`` intra-op threads,
    ``warmup`` untimed then ``runs`` timed runs of each, in alternating blocks)."""

    def __init__(
        self,
        fp32_path: str | os.PathLike,
        example_input: Any,
        threads: int | None = 1,
        warmup: int = 3,
        runs: int = 20,
    ) -> None:
        self.example_input = example_input
        self.threads, self.warmup, self.runs = threads, warmup, runs
        self.fp32_session = make_session(fp32_path, threads)
        self.fp32_feed = session_feeds(self.fp32_session, example_input)

    def __call__(self, path: str | os.PathLike) -> Timing:
        return self.side_by_side({"file": path})["file"]

    def side_by_side(self, paths: dict[str, str | os.PathLike]) -> dict[str, Timing]:
        """All ``paths`` and the FP32 file timed in the same rounds."""
        sessions = {FP32: self.fp32_session}
        feeds = {FP32: self.fp32_feed}
        for name, path in paths.items():
            sessions[name] = make_session(path, self.threads)
            feeds[name] = session_feeds(sessions[name], self.example_input)
        times = time_sessions(sessions, feeds, self.warmup, self.runs)
        fp32_ms = float(np.percentile(times[FP32], 50))
        return {name: Timing(float(np.percentile(times[name], 50)), fp32_ms) for name in paths}
