"""The benchmark says what happened: a slowdown is "slower" (with the likely reason), never
"0.87x faster"; the table's throughput is positional, never ``1.033e+05``."""

from __future__ import annotations

import pandas as pd
import pytest

from workbench.runtime.benchmark import SMALL_MODEL_MS, BenchmarkResult
from workbench.runtime.cpu_features import CpuFeatures

# fixed CPUs, not this machine's: the CPU line's outlook differs between them ("2-4x faster"
# on VNNI), and the wording of the measurement must not depend on where the test runs
CPUS = {
    "avx2": CpuFeatures("AVX2 CPU", avx2=True, avx512=False, vnni=False, amx=False),
    "vnni": CpuFeatures("VNNI CPU", avx2=True, avx512=True, vnni=True, amx=False),
    "amx": CpuFeatures("AMX CPU", avx2=True, avx512=True, vnni=True, amx=True),
    "generic": CpuFeatures("generic CPU", avx2=False, avx512=False, vnni=False, amx=False),
}


def result(fp32_ms: float, int8_ms: float, cpu: str = "avx2") -> BenchmarkResult:
    rows = [
        {"model": name, "latency_p50_ms": ms, "throughput_per_s": 32 / (ms / 1000.0),
         "size_vs_fp32": size, "speedup_vs_fp32": fp32_ms / ms}
        for name, ms, size in (("fp32", fp32_ms, 1.0), ("int8", int8_ms, 0.27))
    ]  # fmt: skip
    return BenchmarkResult(pd.DataFrame(rows), fp32_ms / int8_ms, CPUS[cpu], 1, 32)


@pytest.mark.parametrize("cpu", list(CPUS))
@pytest.mark.parametrize("fp32_ms", [SMALL_MODEL_MS / 5, SMALL_MODEL_MS * 20])
def test_a_slowdown_says_slower_and_why(fp32_ms, cpu):
    outcome = result(fp32_ms, fp32_ms * 1.15, cpu)
    text = outcome.summary_text()
    measured = text.split("\nCPU ")[0]  # what happened; the CPU line is the outlook
    assert "1.15x slower than FP32" in measured and "faster" not in measured
    assert text.endswith(CPUS[cpu].summary())
    small = fp32_ms < SMALL_MODEL_MS
    assert ("too small" in measured) == small
    assert ("did not fuse" in measured) == (not small)


def test_a_speedup_says_faster():
    assert "INT8 2.50x faster than FP32" in result(10.0, 4.0).summary_text()


def test_throughput_is_positional():
    page = result(0.31, 0.3)._repr_html_()
    assert "e+0" not in page and "103,225.806" in page
