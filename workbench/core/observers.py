"""Observers: watch tensors stream past and choose a clipping range.

* ``minmax``     - running min / max (per tensor or per channel).
* ``percentile`` - clip at a percentile (default 99.99) of the values (of |x| when symmetric).
* ``mse``        - the clipping range that minimises the expected quantization MSE.
* ``entropy``    - the threshold minimising the KL divergence between the FP32 histogram and
                   its quantized version (TensorRT's calibration, as ONNX Runtime does it).

The histogram observers keep one fixed-size histogram (``core.histogram``: 2048 bins plus an
exact count of zeros, which ReLU produces in bulk) and re-bin it when a batch widens the range,
so their memory does not grow with the number of calibration batches.

Observers of the same tensor on several processes (one data shard each) combine their
statistics with :meth:`Observer.combine`, given a ``reduce(tensor, op)`` that returns the
elementwise ``"min"`` / ``"max"`` / ``"sum"`` over all of them (the engine passes an
all-reduce); afterwards every observer holds the statistics of the union of the shards.
"""

from __future__ import annotations

import numpy as np
import torch

from workbench.core.blockwise import grouped_rows
from workbench.core.histogram import Reduce, StreamingHistogram
from workbench.core.qparams import check_finite, qparams_from_range
from workbench.core.qtensor import dequantize_with, quantize_with, tensor_range
from workbench.core.scheme import Scheme
from workbench.errors import CalibrationError, ConfigError

OBSERVER_NAMES = ("minmax", "percentile", "mse", "entropy")


class Observer:
    """Base class: ``update`` with tensors, then ``compute_range`` / ``compute_qparams``."""

    name = "observer"

    def __init__(self, scheme: Scheme, tensor_name: str = "tensor") -> None:
        self.scheme = scheme
        self.tensor_name = tensor_name
        self.batches_seen = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        if x.numel() == 0:
            return
        check_finite(x, self.tensor_name)
        self._update(x)
        self.batches_seen += 1

    def _update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def combine(self, reduce: Reduce) -> None:
        """Replace this observer's statistics by those of all peers together (see module
        docstring). Every peer must call it, in the same order, even one that saw no data."""
        seen = reduce(torch.tensor(float(self.batches_seen), dtype=torch.float64), "sum")
        self._combine(reduce)
        self.batches_seen = int(seen)

    def _combine(self, reduce: Reduce) -> None:
        raise ConfigError(
            f"the {self.name} observer cannot combine its statistics over the processes of a "
            "distributed job; give it a _combine method or calibrate in one process"
        )

    def compute_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the observed range."""
        if self.batches_seen == 0:
            raise CalibrationError(
                f"{self.tensor_name} was never observed; run calibration data through the model"
            )
        min_val, max_val = self.compute_range()
        return qparams_from_range(min_val, max_val, self.scheme, self.tensor_name)


class MinMaxObserver(Observer):
    """Running minimum and maximum, per tensor or per channel along ``scheme.axis``."""

    name = "minmax"

    def __init__(self, scheme: Scheme, tensor_name: str = "tensor") -> None:
        super().__init__(scheme, tensor_name)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = tensor_range(x, self.scheme)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            if lo.shape != self.min_val.shape:
                raise CalibrationError(
                    f"{self.tensor_name} changed its number of channels between batches "
                    f"({self.min_val.numel()} then {lo.numel()}); use a per-tensor scheme"
                )
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def _combine(self, reduce: Reduce) -> None:
        # A peer that saw nothing does not know the number of channels: agree on it first.
        channels = 0 if self.min_val is None else self.min_val.numel()
        agreed = int(reduce(torch.tensor(float(channels), dtype=torch.float64), "max"))
        if agreed == 0:
            return
        if self.min_val is None:
            shape = (agreed,) if self.scheme.per_channel else ()
            self.min_val = torch.full(shape, float("inf"))
            self.max_val = torch.full(shape, float("-inf"))
        elif channels != agreed:
            raise CalibrationError(
                f"{self.tensor_name} has {channels} channels here and {agreed} on another "
                "process; use a per-tensor scheme"
            )
        # min(a) == -max(-a) exactly, so one reduction carries both ends
        both = reduce(torch.cat([self.min_val.reshape(-1), -self.max_val.reshape(-1)]), "min")
        self.min_val = both[:agreed].reshape(self.min_val.shape).clone()
        self.max_val = (-both[agreed:]).reshape(self.max_val.shape).clone()


class HistogramObserver(Observer):
    """Base of the histogram observers; per-tensor only."""

    def __init__(self, scheme: Scheme, tensor_name: str = "tensor") -> None:
        if scheme.per_channel:
            raise ConfigError(
                f"the {self.name} observer supports per-tensor schemes only; "
                "use observer='minmax' for per-channel activations"
            )
        super().__init__(scheme, tensor_name)
        self.histogram = StreamingHistogram()
        self.seen_min = float("inf")
        self.seen_max = float("-inf")

    def _update(self, x: torch.Tensor) -> None:
        self.seen_min = min(self.seen_min, float(x.min()))
        self.seen_max = max(self.seen_max, float(x.max()))
        self.histogram.add(x)

    def _combine(self, reduce: Reduce) -> None:
        ends = reduce(torch.tensor([self.seen_min, -self.seen_max], dtype=torch.float64), "min")
        self.seen_min, self.seen_max = float(ends[0]), -float(ends[1])
        self.histogram.combine(reduce)

    def _range(self, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(low, dtype=torch.float32), torch.tensor(high, dtype=torch.float32)

    def _clip_to_threshold(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scheme.symmetric:
            return self._range(-threshold, threshold)
        return self._range(max(self.seen_min, -threshold), min(self.seen_max, threshold))


class PercentileObserver(HistogramObserver):
    """Clip at a percentile of the values (of |x| for symmetric schemes)."""

    name = "percentile"

    def __init__(
        self, scheme: Scheme, tensor_name: str = "tensor", percentile: float = 99.99
    ) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(scheme, tensor_name)
        self.percentile = percentile

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        fraction = self.percentile / 100.0
        hist = self.histogram
        if self.scheme.symmetric:
            counts, width = hist.abs_histogram()
            cumulative = np.concatenate([[0.0], np.cumsum(counts)])
            edges = np.arange(len(counts) + 1) * width
            threshold = float(np.interp(fraction * cumulative[-1], cumulative, edges))
            return self._range(-threshold, threshold)
        low = min(hist.quantile(1.0 - fraction), self.seen_max)
        high = max(hist.quantile(fraction), self.seen_min)
        return self._range(low, high)


class MSEObserver(HistogramObserver):
    """Search the clipping range (scaled towards 0 from min/max) minimising expected MSE.

    For each candidate range, values inside it cost the rounding noise step^2 / 12 and values
    outside cost their squared distance to the clipping edge; exact zeros cost nothing.
    """

    name = "mse"
    candidates = 200

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self.histogram
        edges = hist.edges
        centers = (edges[:-1] + edges[1:]) / 2.0
        width = edges[1] - edges[0]
        min_neg, max_pos = min(self.seen_min, 0.0), max(self.seen_max, 0.0)
        if self.scheme.symmetric:
            amax = max(-min_neg, max_pos)
            min_neg, max_pos = -amax, amax
        alphas = np.linspace(1.0 / self.candidates, 1.0, self.candidates)[:, None]
        low, high = alphas * min_neg, alphas * max_pos
        step = (high - low) / float(self.scheme.levels - 1)
        outside = np.where(
            centers < low, low - centers, np.where(centers > high, centers - high, 0)
        )
        inside = outside == 0
        cost = np.where(inside, step**2 / 12.0, outside**2 + width**2 / 12.0)
        total = (cost * hist.counts[None, :]).sum(axis=1)
        best = int(np.argmin(total))
        return self._range(float(low[best, 0]), float(high[best, 0]))


class EntropyObserver(HistogramObserver):
    """KL-divergence calibration (TensorRT): pick the |x| threshold whose quantized histogram
    diverges least from the FP32 one."""

    name = "entropy"

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Exact zeros (ReLU outputs, padding) are exact under any threshold: they carry no
        # information about the clipping choice and would only bias it towards small ranges.
        counts, width = self.histogram.abs_histogram(include_zeros=False)
        threshold_bin = kl_threshold_bin(counts, max(self.scheme.levels // 2, 2))
        return self._clip_to_threshold(threshold_bin * width)


ENTROPY_MIN_COVERAGE = 0.99


def kl_threshold_bin(
    counts: np.ndarray, quantized_bins: int, min_coverage: float = ENTROPY_MIN_COVERAGE
) -> int:
    """Number of histogram bins to keep so that KL(P || Q) is minimal (TensorRT's algorithm).

    The search starts where the kept bins cover ``min_coverage`` of the values: on discrete
    data (pixel intensities, one-hot inputs) the KL divergence of a threshold that folds almost
    everything into one bin is trivially 0, and TensorRT's search would pick it.
    """
    bins = len(counts)
    if counts.sum() == 0 or bins <= quantized_bins:
        return bins
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])
    covered = 1.0 - tail / tail[0]
    first = max(quantized_bins, int(np.searchsorted(covered, min_coverage)))
    best_bin, best_kl = bins, np.inf
    for keep in range(first, bins + 1):
        reference = counts[:keep].copy()
        reference[-1] += tail[keep]
        kept = counts[:keep]
        chunk = (np.arange(keep) * quantized_bins) // keep
        chunk_sum = np.bincount(chunk, weights=kept, minlength=quantized_bins)
        # Bins empty in P stay empty in Q. P's last bin holds the clipped tail, so it counts
        # as occupied even when the histogram's own bin there is empty (as TensorRT does).
        nonzero = (reference > 0).astype(np.float64)
        chunk_nonzero = np.bincount(chunk, weights=nonzero, minlength=quantized_bins)
        share = np.divide(
            chunk_sum,
            chunk_nonzero,
            out=np.zeros_like(chunk_sum),
            where=chunk_nonzero > 0,
        )
        expanded = share[chunk] * nonzero
        p = reference / reference.sum()
        q_total = expanded.sum()
        if q_total == 0:
            continue
        q = expanded / q_total
        mask = p > 0
        q_masked = np.where(q[mask] > 0, q[mask], 1e-12)
        kl = float(np.sum(p[mask] * np.log(p[mask] / q_masked)))
        if kl < best_kl:
            best_kl, best_bin = kl, keep
    return best_bin


def make_observer(
    name: str, scheme: Scheme, tensor_name: str = "tensor", percentile: float = 99.99
) -> Observer:
    """Create an observer by name (``minmax``, ``percentile``, ``mse``, ``entropy``)."""
    if name == "minmax":
        return MinMaxObserver(scheme, tensor_name)
    if name == "percentile":
        return PercentileObserver(scheme, tensor_name, percentile)
    if name == "mse":
        return MSEObserver(scheme, tensor_name)
    if name == "entropy":
        return EntropyObserver(scheme, tensor_name)
    raise ConfigError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVER_NAMES)}")


def weight_range_mse(
    weight: torch.Tensor, scheme: Scheme, candidates: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel, per-group (block-wise) or per-tensor clipping range of a weight minimising
    its exact quantization MSE, searched over ranges shrunk from min/max by factors in (0.5, 1]."""
    min_val, max_val = tensor_range(weight, scheme)
    best_err = None
    best_min, best_max = min_val, max_val
    for alpha in torch.linspace(0.5, 1.0, candidates):
        lo, hi = min_val * alpha, max_val * alpha
        scale, zp = qparams_from_range(lo, hi, scheme, "weight")
        deq = dequantize_with(quantize_with(weight, scale, zp, scheme), scale, zp, scheme)
        sq = (weight - deq) ** 2
        if scheme.group_size is not None:
            err = grouped_rows(sq, scheme.group_size).sum(dim=1).reshape(min_val.shape)
        elif scheme.per_channel:
            axis = scheme.axis % weight.dim()
            err = sq.transpose(0, axis).reshape(weight.shape[axis], -1).sum(dim=1)
        else:
            err = sq.sum()
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_min = torch.where(better, lo, best_min)
        best_max = torch.where(better, hi, best_max)
    return best_min, best_max
