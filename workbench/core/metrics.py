"""Error metrics between a reference tensor and its quantized approximation.

SQNR (dB) = 10 log10( sum(ref^2) / sum((ref - approx)^2) );  cosine = <ref, approx> / |ref||approx|

Computed in float64; tensors or NumPy arrays (ONNX Runtime's outputs) alike.
"""

from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    acc = ErrorAccumulator()
    acc.add(reference, approx)
    return acc.sqnr_db


def cosine(reference: torch.Tensor, approx: torch.Tensor) -> float:
    acc = ErrorAccumulator()
    acc.add(reference, approx)
    return acc.cosine


CHUNK_ELEMENTS = 1 << 22  # float64 temporaries of 32 MiB


class ErrorAccumulator:
    """Sums over batches so that SQNR, MSE and cosine cover all of them, not an average of
    per-batch figures."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.dot = 0.0
        self.approx_energy = 0.0
        self.count = 0

    def add(self, reference: torch.Tensor, approx: torch.Tensor) -> None:
        ref_all = torch.as_tensor(reference).detach().reshape(-1)
        app_all = torch.as_tensor(approx).detach().reshape(-1)
        # float64 a chunk at a time: an LM head's weight is not copied whole into float64
        for start in range(0, max(ref_all.numel(), 1), CHUNK_ELEMENTS):
            ref = ref_all[start : start + CHUNK_ELEMENTS].double()
            app = app_all[start : start + CHUNK_ELEMENTS].double()
            difference = ref - app
            self.signal += float(ref @ ref)
            self.noise += float(difference @ difference)
            self.dot += float(ref @ app)
            self.approx_energy += float(app @ app)
        self.count += ref_all.numel()

    @property
    def sqnr_db(self) -> float:
        if self.count == 0:
            return float("nan")
        if self.noise == 0.0:
            return float("inf")
        if self.signal == 0.0:
            return float("-inf")
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def mse(self) -> float:
        return self.noise / self.count if self.count else float("nan")

    @property
    def cosine(self) -> float:
        if self.count == 0:
            return float("nan")  # nothing measured
        denom = math.sqrt(self.signal * self.approx_energy)
        if denom == 0.0:
            return 1.0 if self.noise == 0.0 else 0.0
        return self.dot / denom
