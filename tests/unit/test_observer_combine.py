"""Observer.combine: observers of shards end with the statistics of the union of the shards.

Peers run in threads with a reduce built on a barrier, the way an all-reduce pairs the
processes of a job; the reference is one observer fed every shard.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from workbench.core.histogram import HISTOGRAM_BINS
from workbench.core.observers import make_observer
from workbench.core.scheme import Scheme

OPS = {"min": torch.minimum, "max": torch.maximum, "sum": torch.add}


def combine_all(observers) -> None:
    """Each observer combines in its own thread; reduce waits for every peer's tensor."""
    count = len(observers)
    barrier = threading.Barrier(count)
    slots: list[torch.Tensor | None] = [None] * count

    def reduce_for(index):
        def reduce(tensor, op):
            slots[index] = tensor.clone()
            barrier.wait()
            result = slots[0]
            for other in slots[1:]:
                result = OPS[op](result, other)
            barrier.wait()  # everybody has read the slots before they are reused
            return result.clone()

        return reduce

    errors = []

    def run(index):
        try:
            observers[index].combine(reduce_for(index))
        except BaseException as exc:  # reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors


def shards(seed: int = 0, count: int = 3):
    """Batches of ReLU-like activations whose range grows from shard to shard (so each
    histogram has its own range before combining) with many exact zeros."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for shard in range(count):
        batches = []
        for _ in range(4):
            x = torch.randn(64, 8, generator=generator) * (1.0 + shard) + 0.3 * shard
            batches.append(torch.relu(x) - 0.05 * shard)
        out.append(batches)
    return out


def observed(name, scheme, batches):
    observer = make_observer(name, scheme, "x")
    for batch in batches:
        observer.update(batch)
    return observer


@pytest.mark.parametrize(
    "scheme", [Scheme(8, False, False), Scheme(8, True, True, axis=1)], ids=["tensor", "channel"]
)
def test_minmax_combined_equals_minmax_of_the_union(scheme):
    data = shards()
    peers = [observed("minmax", scheme, batches) for batches in data]
    peers.append(make_observer("minmax", scheme, "x"))  # a process whose shard was empty
    combine_all(peers)
    single = observed("minmax", scheme, [b for batches in data for b in batches])
    for peer in peers:
        assert torch.equal(peer.min_val, single.min_val)
        assert torch.equal(peer.max_val, single.max_val)
        assert peer.batches_seen == single.batches_seen
        for mine, reference in zip(peer.compute_qparams(), single.compute_qparams(), strict=True):
            assert torch.equal(mine, reference)


@pytest.mark.parametrize("name", ["percentile", "mse", "entropy"])
def test_histograms_combined_match_the_union_within_one_bin(name):
    scheme = Scheme(8, False, False)
    data = shards(seed=1)
    peers = [observed(name, scheme, batches) for batches in data]
    peers.append(make_observer(name, scheme, "x"))
    combine_all(peers)
    single = observed(name, scheme, [b for batches in data for b in batches])
    everything = torch.cat([b.reshape(-1) for batches in data for b in batches])
    nonzero = everything[everything != 0]
    bin_width = float(nonzero.max() - nonzero.min()) / HISTOGRAM_BINS
    first = peers[0]
    for peer in peers:  # identical on every process, bit for bit
        assert np.array_equal(peer.histogram.counts, first.histogram.counts)
        for mine, reference in zip(peer.compute_qparams(), first.compute_qparams(), strict=True):
            assert torch.equal(mine, reference)
    assert first.histogram.total == pytest.approx(everything.numel(), rel=1e-12)
    assert first.histogram.zero_count == float((everything == 0).sum())
    assert (first.seen_min, first.seen_max) == (float(everything.min()), float(everything.max()))
    # the histograms agree within one bin: every quantile, against the exact one too
    for fraction in np.linspace(0.02, 0.98, 25):
        exact = float(torch.quantile(everything, float(fraction)))
        assert first.histogram.quantile(fraction) == pytest.approx(exact, abs=bin_width)
        assert first.histogram.quantile(fraction) == pytest.approx(
            single.histogram.quantile(fraction), abs=bin_width
        )
    if name != "entropy":  # the KL argmin is not continuous in the counts: see test_distributed
        low, high = first.compute_range()
        ref_low, ref_high = single.compute_range()
        assert float(low) == pytest.approx(float(ref_low), abs=bin_width)
        assert float(high) == pytest.approx(float(ref_high), abs=bin_width)
