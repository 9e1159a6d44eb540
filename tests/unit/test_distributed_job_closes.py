"""The distributed Job releases its process groups when the ``with`` block ends, also when
the block raises (a failed run must not leak them)."""

from __future__ import annotations

import pytest

from workbench.engine.training import distributed


@pytest.fixture
def destroyed(monkeypatch):
    released: list[object] = []
    monkeypatch.setattr(distributed.dist, "destroy_process_group", released.append)
    job = distributed.Job(0, 2, 1.0, "gloo-group", "nccl-group", "nccl")
    monkeypatch.setattr(distributed, "join_job", lambda device=None: job)
    return released


def test_groups_are_released_after_the_block(destroyed):
    with distributed.distributed_job() as job:
        assert job.world_size == 2 and destroyed == []
    assert destroyed == ["gloo-group", "nccl-group"]


def test_groups_are_released_when_the_block_raises(destroyed):
    with pytest.raises(ValueError, match="calibration failed"), distributed.distributed_job():
        raise ValueError("calibration failed")
    assert destroyed == ["gloo-group", "nccl-group"]


def test_outside_a_job_there_is_nothing_to_release(monkeypatch):
    monkeypatch.setattr(distributed, "join_job", lambda device=None: None)
    with distributed.distributed_job() as job:
        assert job is None
