"""The benchmark says what happened: a slowdown is "slower" (with the likely reason), never
"0.87x faster"; the table's throughput is positional, never ``1.033e+05``."""

from __future__ import annotations

import pandas as pd
import pytest

from workbench.runtime.benchmark import SMALL_MODEL_MS, BenchmarkResult
from workbench.runtime.cpu_features import detect_cpu_features


def result(fp32_ms: float, int8_ms: float) -> BenchmarkResult:
    rows = [
        {"model": name, "latency_p50_ms": ms, "throughput_per_s": 32 / (ms / 1000.0),
         "size_vs_fp32": size, "speedup_vs_fp32": fp32_ms / ms}
        for name, ms, size in (("fp32", fp32_ms, 1.0), ("int8", int8_ms, 0.27))
    ]  # fmt: skip
    return BenchmarkResult(pd.DataFrame(rows), fp32_ms / int8_ms, detect_cpu_features(), 1, 32)


@pytest.mark.parametrize("fp32_ms", [SMALL_MODEL_MS / 5, SMALL_MODEL_MS * 20])
def test_a_slowdown_says_slower_and_why(fp32_ms):
    text = result(fp32_ms, fp32_ms * 1.15).summary_text()
    assert "1.15x slower than FP32" in text and "faster" not in text
    small = fp32_ms < SMALL_MODEL_MS
    assert ("too small" in text) == small
    assert ("did not fuse" in text) == (not small)


def test_a_speedup_says_faster():
    assert "INT8 2.50x faster than FP32" in result(10.0, 4.0).summary_text()


def test_throughput_is_positional():
    page = result(0.31, 0.3)._repr_html_()
    assert "e+0" not in page and "103,225.806" in page
