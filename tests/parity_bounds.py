"""How far ONNX Runtime may be from the simulated model: a bound from the quantization itself,
not fixed digits.

ONNX Runtime computes each op in its own order (AMX, AVX-512 VNNI and AVX2 kernels differ from
torch's and from each other), so a value close to a rounding boundary can land on the other
side of it at the next quantizer and move by one quantization step. The quantization itself
moves every value by up to half a step (step^2 / 12 of noise per value); while fewer than one
value in twelve flips, ONNX Runtime's distance to the simulation stays below the simulation's
distance to FP32. The bound scales with the quantization step of each model and holds on
every CPU, where a fixed cosine (0.9999) held on one CPU and failed on another.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _flat(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).ravel()


# float32's own rounding, which a kernel's summation order changes by a few units in the last
# place of each output even where the quantization is exact (a weight of one value per channel)
FLOAT32_ULPS = 16 * float(np.finfo(np.float32).eps)


def assert_within_quantization_error(onnx_out: Any, simulated: Any, fp32: Any) -> None:
    """ONNX Runtime's output is closer to the simulation than the simulation is to FP32 (plus
    float32's rounding of the output, for a quantization that happens to be exact)."""
    onnx_out, simulated, fp32 = _flat(onnx_out), _flat(simulated), _flat(fp32)
    assert onnx_out.shape == simulated.shape == fp32.shape
    kernel_error = float(np.linalg.norm(onnx_out - simulated))
    quantization_error = float(np.linalg.norm(simulated - fp32))
    rounding = FLOAT32_ULPS * float(np.linalg.norm(simulated))
    assert kernel_error <= quantization_error + rounding, (kernel_error, quantization_error)


def assert_parity_within_quantization_error(row: Any) -> None:
    """The same bound on a row of ``result.parity(...).table``: the angle between ONNX
    Runtime's output and the simulation's is below the angle the quantization opened
    between the simulation and FP32 (``1 - cosine`` is half the squared distance of the
    normalized outputs; float32's rounding adds ``FLOAT32_ULPS^2 / 2`` to it)."""
    rounding = FLOAT32_ULPS**2 / 2
    assert 1.0 - row["cosine"] <= 1.0 - row["cosine_sim_vs_fp32"] + rounding, dict(row)
