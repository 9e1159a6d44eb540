"""A streaming histogram of fixed size: what the histogram observers keep of the tensors.

2048 bins plus an exact count of zeros (which ReLU produces in bulk); when a batch widens the
range the counts are re-binned onto the new one (through the cumulative distribution), so
memory does not grow with the number of calibration batches. Histograms of the same tensor on
several processes combine into the histogram of the union (``combine``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

HISTOGRAM_BINS = 2048

# reduce(tensor, op) -> the elementwise op ("min", "max" or "sum") of tensor over all peers
Reduce = Callable[[torch.Tensor, str], torch.Tensor]


class StreamingHistogram:
    """A fixed-size histogram whose range grows as data arrives; zeros are counted exactly."""

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.low = 0.0
        self.high = 0.0
        self.zero_count = 0.0
        self.empty = True

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, self.bins + 1)

    @property
    def total(self) -> float:
        return float(self.counts.sum() + self.zero_count)

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1)
        nonzero = flat[flat != 0]
        self.zero_count += float(flat.numel() - nonzero.numel())
        if nonzero.numel() == 0:
            return
        lo, hi = float(nonzero.min()), float(nonzero.max())
        if self.empty:
            self.low, self.high, self.empty = lo, hi, False
            if self.high <= self.low:
                self.high = self.low + max(abs(self.low), 1.0) * 1e-6
        elif lo < self.low or hi > self.high:
            self._rebin(min(lo, self.low), max(hi, self.high))
        batch = torch.histc(nonzero, bins=self.bins, min=self.low, max=self.high)
        self.counts += batch.double().numpy()

    def combine(self, reduce: Reduce) -> None:
        """Sum this histogram with its peers': all are re-binned onto the range that covers
        every one of them, then their counts are added (see ``Observer.combine``)."""
        low = float("inf") if self.empty else self.low
        high = float("-inf") if self.empty else self.high
        ends = reduce(torch.tensor([low, -high], dtype=torch.float64), "min")
        common_low, common_high = float(ends[0]), -float(ends[1])
        if common_low <= common_high:  # some peer holds non-zero values
            if self.empty:
                self.counts = np.zeros(self.bins, dtype=np.float64)
                self.low, self.high, self.empty = common_low, common_high, False
            elif (self.low, self.high) != (common_low, common_high):
                self._rebin(common_low, common_high)
            self.counts = reduce(torch.from_numpy(self.counts), "sum").numpy().copy()
        zeros = reduce(torch.tensor(self.zero_count, dtype=torch.float64), "sum")
        self.zero_count = float(zeros)

    def _rebin(self, new_low: float, new_high: float) -> None:
        old_edges = self.edges
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        new_edges = np.linspace(new_low, new_high, self.bins + 1)
        cdf_at_new = np.interp(new_edges, old_edges, cumulative, left=0.0, right=cumulative[-1])
        self.counts = np.diff(cdf_at_new)
        self.low, self.high = new_low, new_high

    def cdf(self, t: np.ndarray) -> np.ndarray:
        """Number of values <= t (zeros included as a point mass at 0)."""
        t = np.asarray(t, dtype=np.float64)
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        below = np.interp(t, self.edges, cumulative, left=0.0, right=cumulative[-1])
        return below + np.where(t >= 0, self.zero_count, 0.0)

    def quantile(self, fraction: float) -> float:
        """Value below which ``fraction`` of all values lie (inverse CDF)."""
        grid = np.sort(np.concatenate([self.edges, [0.0]]))
        return float(np.interp(fraction * self.total, self.cdf(grid), grid))

    def abs_histogram(self, include_zeros: bool = True) -> tuple[np.ndarray, float]:
        """Histogram of |x| over [0, max|x|] with ``bins`` bins; returns (counts, bin width)."""
        amax = max(abs(self.low), abs(self.high))
        edges = np.linspace(0.0, amax, self.bins + 1)
        # |x| <= t  <=>  -t <= x <= t; the histogram part is continuous, zeros are apart.
        cumulative = self.cdf(edges) - self.cdf(-edges)
        cumulative[0] = self.zero_count
        counts = np.clip(np.diff(cumulative), 0.0, None)
        if include_zeros:
            counts[0] += self.zero_count
        return counts, amax / self.bins
