"""engine.training.distributed's data side, without a process group: shards, epochs, the timeout."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from workbench.engine.training.distributed import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    Job,
    reshuffled_epochs,
    shard_loader,
    timeout_s,
)
from workbench.errors import ConfigError


def job(rank: int, world_size: int = 2) -> Job:
    return Job(rank, world_size, 10.0, None, None, "gloo")


def dataset(count: int = 40) -> TensorDataset:
    return TensorDataset(torch.arange(count).float(), torch.arange(count))


def samples(loader) -> list[int]:
    return [int(i) for _, targets in loader for i in targets]


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_loader_is_sharded_into_disjoint_shards_covering_the_data(shuffle):
    generator = torch.Generator().manual_seed(3)
    loader = DataLoader(dataset(), batch_size=4, shuffle=shuffle, generator=generator)
    shards = [shard_loader(loader, job(rank)) for rank in range(2)]
    seen = [samples(shard) for shard in shards]
    assert sorted(seen[0] + seen[1]) == list(range(40))
    assert not set(seen[0]) & set(seen[1])
    for shard in shards:
        assert isinstance(shard.sampler, DistributedSampler) and shard.sampler.shuffle == shuffle
        assert shard.batch_size == 4 and len(shard) == 5
    assert samples(loader) == samples(loader) or shuffle  # the user's loader is left as it is
    assert not isinstance(loader.sampler, DistributedSampler)


def test_each_epoch_of_a_shuffled_shard_is_shuffled_anew():
    loader = DataLoader(dataset(), batch_size=4, shuffle=True)
    shards = [shard_loader(loader, job(rank)) for rank in range(2)]
    epochs = [reshuffled_epochs(lambda s=shard: iter(s), shard) for shard in shards]
    first = [samples(batches_of_epoch()) for batches_of_epoch in epochs]
    second = [samples(batches_of_epoch()) for batches_of_epoch in epochs]
    for epoch in (first, second):  # every epoch, the shards split the data between them
        assert sorted(epoch[0] + epoch[1]) == list(range(40))
    assert first[0] != second[0]


def test_what_is_already_a_shard_is_left_alone():
    batches = [torch.zeros(2, 3)]
    assert shard_loader(batches, job(1)) is batches
    sharded = DataLoader(dataset(), sampler=DistributedSampler(dataset(), 2, 0))
    assert shard_loader(sharded, job(0)) is sharded


def test_a_custom_batch_sampler_cannot_be_sharded():
    class Pairs(BatchSampler):
        pass

    loader = DataLoader(dataset(), batch_sampler=Pairs(range(40), 2, False))
    with pytest.raises(ConfigError, match="DistributedSampler yourself"):
        shard_loader(loader, job(0))


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_s() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert timeout_s() == 2.5
    for bad in ("0", "soon", "-1"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=TIMEOUT_ENV):
            timeout_s()
