"""Errors carry codes: each kind its own, a collective's failure a finer one decided by
torch.distributed's error classes, or by gloo's message where gloo gives nothing else."""

from __future__ import annotations

import pickle

import pytest
import torch.distributed as dist

import workbench as wb
from workbench.engine.training.distributed import failure_kind, gloo_failure_kind

# recorded from gloo here (torch 2.13, two processes on 127.0.0.1): rank 1 exited, and rank 1
# slept past the group's 3 s timeout, while rank 0 waited in all_reduce
GLOO_PEER_EXITED = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
    "[127.0.0.1]:47256: Connection reset by peer. This is typically caused by a remote worker "
    "hanging or bugs in the application"
)
GLOO_TIMEOUT = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed "
    "out waiting 3000ms for recv operation to complete"
)


def test_each_error_kind_has_its_code():
    kinds = {
        wb.ConfigError: "config",
        wb.CalibrationError: "calibration",
        wb.ModelError: "model",
        wb.ExportError: "export",
        wb.DistributedError: "distributed",
    }
    for error_class, code in kinds.items():
        assert error_class("x").code == code
    error = wb.DistributedError("rank 0 timed out", code="distributed.timeout")
    assert error.code == "distributed.timeout"
    assert pickle.loads(pickle.dumps(error)).code == "distributed.timeout"


def test_gloo_messages_are_read_in_one_place():
    assert gloo_failure_kind(GLOO_PEER_EXITED) == "peer_lost"
    assert gloo_failure_kind(GLOO_TIMEOUT) == "timeout"
    assert failure_kind(RuntimeError(GLOO_TIMEOUT)) == "timeout"
    assert failure_kind(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


@pytest.mark.skipif(not hasattr(dist, "DistNetworkError"), reason="torch < 2.2")
def test_torch_error_classes_decide_without_the_message():
    assert failure_kind(dist.DistNetworkError("")) == "peer_lost"
    assert failure_kind(dist.DistStoreError("")) == "store"
    assert failure_kind(dist.DistBackendError("")) == "backend"
    assert failure_kind(wb.ConfigError("gloo timed out")) is None  # ours, not a collective's
