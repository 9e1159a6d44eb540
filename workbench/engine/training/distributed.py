"""PTQ / QAT inside a ``torch.distributed`` job (``torchrun``, ``accelerate launch``,
``torch.multiprocessing.spawn`` + ``init_process_group``): one process per data shard.

When the default process group is initialised with more than one process:

* the model copy every process quantizes starts from rank 0's weights (broadcast);
* every process calibrates on its own shard, then the observers combine their statistics
  (``Observer.combine``: min / max all-reduced with MIN / MAX; histograms re-binned onto the
  range covering every shard, then summed), so every process computes the same scales and
  zero points, those of calibration on the union of the shards;
* QAT trains the prepared model under ``DistributedDataParallel`` (learned scales are
  parameters by then, so their gradients are averaged like the weights');
* a DataLoader without a ``DistributedSampler`` is given one, so each process reads its shard;
* only rank 0 writes files (exports, reports) and shows progress bars.

Our collectives run on process groups of our own whose timeout is
``WORKBENCH_DIST_TIMEOUT_S`` (default :data:`DEFAULT_TIMEOUT_S`): when one process stops
(an exception, a KeyboardInterrupt), the others fail with a :class:`DistributedError` within
that time instead of waiting forever. The backend follows the tensors: gloo for what stays on
the CPU (calibration statistics), NCCL when training runs on CUDA.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from workbench.engine.placement.graph_quantizers import OutputQuantized
from workbench.engine.quantizers.modules import ActivationQuantizer
from workbench.errors import ConfigError, DistributedError, WorkbenchError, first_line

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "WORKBENCH_DIST_TIMEOUT_S"
_REDUCE_OPS = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


@dataclass
class Job:
    """This process's place in the job and the process groups our collectives use."""

    rank: int
    world_size: int
    timeout_s: float
    cpu_group: Any  # gloo: calibration statistics, objects
    train_group: Any  # the backend of the training device
    backend: str

    @property
    def writes_files(self) -> bool:
        return self.rank == 0

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release our process groups (every process calls it, after the last collective)."""
        groups = [self.cpu_group] + ([self.train_group] if self.train_group is not None else [])
        for group in dict.fromkeys(groups):
            dist.destroy_process_group(group)


def timeout_s() -> float:
    """The collective timeout of a distributed run, in seconds (``WORKBENCH_DIST_TIMEOUT_S``)."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return value


def join_job(device: torch.device | None = None) -> Job | None:
    """The job this process belongs to, or None outside a multi-process job. Every process
    must call it at the same point (it creates process groups)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    seconds = timeout_s()
    timeout = timedelta(seconds=seconds)
    with collective_errors(seconds, "starting the distributed run"):
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        backend = "gloo"
        train_group = cpu_group
        if device is not None and device.type == "cuda":
            backend = "nccl"
            train_group = dist.new_group(backend="nccl", timeout=timeout)
    return Job(dist.get_rank(), dist.get_world_size(), seconds, cpu_group, train_group, backend)


@contextlib.contextmanager
def distributed_job(device: torch.device | None = None) -> Iterator[Job | None]:
    """``join_job``'s Job for a ``with`` block, its process groups released when the block
    ends, by an exception too; None outside a multi-process job."""
    job = join_job(device)
    with job if job is not None else contextlib.nullcontext():
        yield job


# torch.distributed's own error class (a RuntimeError; DistError since torch 2.2, gloo's
# timeouts and closed connections are plain RuntimeErrors named by their message)
DIST_ERROR = getattr(dist, "DistError", RuntimeError)
COLLECTIVE_ERRORS = (RuntimeError, DIST_ERROR)


@contextlib.contextmanager
def collective_errors(seconds: float, doing: str) -> Iterator[None]:
    """Turn a collective's failure (a peer stopped, or the timeout passed) into one
    :class:`DistributedError` naming what to look at."""
    try:
        yield
    except COLLECTIVE_ERRORS as exc:
        failure = collective_failure(exc, seconds, doing)
        if failure is None:
            raise
        raise failure from exc


def collective_failure(exc: BaseException, seconds: float, doing: str) -> DistributedError | None:
    """The :class:`DistributedError` telling ``exc``, when ``exc`` is a collective's failure
    (a peer stopped or the timeout passed; its ``code`` says which); None for any other
    error."""
    kind = failure_kind(exc)
    if kind is None:
        return None
    return DistributedError(
        f"rank {dist.get_rank()}: another process stopped or did not answer within "
        f"{seconds:g} s while {doing} ({first_line(exc)}); see the other processes' "
        f"errors, or raise {TIMEOUT_ENV} if a step legitimately takes longer",
        code=f"distributed.{kind}",
    )


# torch.distributed's own error classes, where it raises them (torch >= 2.2)
_DIST_ERROR_KINDS = tuple(
    (getattr(dist, name), kind)
    for name, kind in (
        ("DistNetworkError", "peer_lost"),
        ("DistStoreError", "store"),
        ("DistBackendError", "backend"),
        ("DistError", "backend"),
    )
    if hasattr(dist, name)
)


def failure_kind(exc: BaseException) -> str | None:
    """What kind of collective failure ``exc`` is: ``timeout``, ``peer_lost``, ``store`` or
    ``backend``; None for any other error. torch.distributed's own error classes say it
    where torch raises them; gloo raises plain RuntimeErrors whose message is all there is,
    read by :func:`gloo_failure_kind` alone."""
    if isinstance(exc, WorkbenchError):
        return None
    for error_class, kind in _DIST_ERROR_KINDS:
        if isinstance(exc, error_class):
            return gloo_failure_kind(str(exc)) or kind
    return gloo_failure_kind(str(exc))


def gloo_failure_kind(message: str) -> str | None:
    """The failure kind a gloo (or NCCL) error message tells: gloo's transport raises
    ``RuntimeError("[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms
    for recv operation to complete")`` or ``"... Read error [...]: Connection reset by peer"``,
    with no error class or code of its own."""
    text = message.lower()
    if "timed out" in text:
        return "timeout"
    if "connection" in text or "peer" in text:
        return "peer_lost"
    if "gloo" in text or "nccl" in text:
        return "backend"
    return None


# calibration ----------------------------------------------------------------------------------
def start_from_rank0(model: nn.Module, first_batch: Any, job: Job) -> Any:
    """Give ``model`` (the workbench's own copy) rank 0's weights and return rank 0's first
    batch: what every process prepares the model from, so that all insert the same quantizers
    (BatchNorm folding and quantizer placement look at one batch)."""
    broadcast_model(model, job)
    return share_from_rank0(first_batch, job)


def broadcast_model(model: nn.Module, job: Job) -> None:
    """Rank 0's parameters and buffers on every process (in place)."""
    with collective_errors(job.timeout_s, "sharing rank 0's weights"), torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                dist.broadcast(tensor.data, src=0, group=job.cpu_group)
            else:
                dist.broadcast(tensor.data, src=0, group=job.train_group)


def combine_calibration(model: nn.Module, reached: set[str], job: Job) -> set[str]:
    """Combine every observer's statistics over the processes; returns the layers reached on
    any process. Called on every process after calibrating on its own shard."""
    group = job.cpu_group

    def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        combined = tensor.detach().clone()
        dist.all_reduce(combined, op=_REDUCE_OPS[op], group=group)
        return combined

    with collective_errors(job.timeout_s, "combining calibration statistics"):
        everyone: list[Any] = [None] * job.world_size
        dist.all_gather_object(everyone, sorted(reached), group=group)
        for module in model.modules():  # the same order on every process: the same model
            if isinstance(module, ActivationQuantizer) and module.observer is not None:
                module.observer.combine(reduce)
            elif isinstance(module, OutputQuantized):
                calls = reduce(torch.tensor(float(module.observed_calls)), "sum")
                module.observed_calls = int(calls)
    return set().union(*map(set, everyone))


def share_from_rank0(value: Any, job: Job) -> Any:
    """Rank 0's ``value`` (any picklable object) on every process."""
    box = [value if job.rank == 0 else None]
    with collective_errors(job.timeout_s, "sharing rank 0's results"):
        dist.broadcast_object_list(box, src=0, group=job.cpu_group)
    return box[0]


def share_report(report: Any, model: nn.Module, job: Job) -> Any:
    """Rank 0's report on every process, attached to this process's (identical) model; the
    model itself does not travel."""
    attached = report._model
    report._model = None
    try:
        shared = share_from_rank0(report, job)
    finally:
        report._model = attached
    shared._model = model
    return shared


# training -------------------------------------------------------------------------------------
def shard_loader(data: Any, job: Job) -> Any:
    """A DataLoader without a DistributedSampler, re-made with one (same dataset, batch size
    and collation; shuffled when the original was), so each process reads its own shard.
    Anything else is taken as this process's shard already."""
    if not isinstance(data, DataLoader) or isinstance(data.sampler, DistributedSampler):
        return data
    if data.batch_sampler is not None and not _plain_batch_sampler(data):
        raise ConfigError(
            "the DataLoader has a custom batch_sampler, which cannot be sharded over the "
            "processes; give it a DistributedSampler yourself or pass this process's batches"
        )
    shuffle = isinstance(data.sampler, RandomSampler)
    seed = 0
    if shuffle and data.generator is not None:
        seed = int(data.generator.initial_seed())
    sampler = DistributedSampler(
        data.dataset,
        num_replicas=job.world_size,
        rank=job.rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=data.drop_last,
    )
    return DataLoader(
        data.dataset,
        batch_size=data.batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        collate_fn=data.collate_fn,
        pin_memory=data.pin_memory,
        drop_last=data.drop_last,
        timeout=data.timeout,
        worker_init_fn=data.worker_init_fn,
        persistent_workers=data.persistent_workers,
    )


def _plain_batch_sampler(data: DataLoader) -> bool:
    from torch.utils.data import BatchSampler

    return type(data.batch_sampler) is BatchSampler and data.batch_size is not None


def reshuffled_epochs(
    batches_of_epoch: Callable[[], Iterator], data: Any
) -> Callable[[], Iterator]:
    """``batches_of_epoch`` that first tells a DistributedSampler of ``data`` which epoch
    starts (``set_epoch``, as PyTorch asks), so each epoch is shuffled differently."""
    sampler = getattr(data, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return batches_of_epoch
    epochs = itertools.count()

    def next_epoch() -> Iterator:
        sampler.set_epoch(next(epochs))
        return batches_of_epoch()

    return next_epoch


def check_equal_steps(steps_per_epoch: int | None, job: Job) -> None:
    """DDP needs the same number of steps on every process; a clear error before training
    when the shards' lengths are known and differ."""
    value = -1 if steps_per_epoch is None else steps_per_epoch
    everyone: list[Any] = [None] * job.world_size
    with collective_errors(job.timeout_s, "comparing the shards' lengths"):
        dist.all_gather_object(everyone, value, group=job.cpu_group)
    known = {count for count in everyone if count >= 0}
    if len(known) > 1 or (known and -1 in everyone):
        counts = ", ".join(f"rank {r}: {'?' if c < 0 else c}" for r, c in enumerate(everyone))
        raise ConfigError(
            f"the processes have different numbers of training batches per epoch ({counts}); "
            "DistributedDataParallel needs the same on every process: pass a DataLoader "
            "(it is sharded with a DistributedSampler) or equal shards"
        )


def wrap_ddp(model: nn.Module, job: Job, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel on ``device`` (gradients averaged over the
    processes, learned scales included)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device] if device.type == "cuda" else None
    with collective_errors(job.timeout_s, "wrapping the model in DistributedDataParallel"):
        return DistributedDataParallel(model, device_ids=device_ids, process_group=job.train_group)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a user's DistributedDataParallel wrapper (QAT wraps its own copy)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
