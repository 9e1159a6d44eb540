"""The QAT loop: steps over the epochs' batches, BatchNorm frozen on schedule, one log.

What the loop trains is prepared elsewhere: the quantizers' training modes in
``engine.quantizers.qat``, live conv-BN in ``engine.training.live_bn``, the options in
``engine.training.options`` and the batches in ``engine.calibration.batches``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.engine.calibration.batches import forward_loss, move_batch
from workbench.engine.calibration.eval_metric import measure_metric
from workbench.engine.quantizers.qat import learned_scales, scale_values
from workbench.engine.training.distributed import (
    COLLECTIVE_ERRORS,
    Job,
    broadcast_model,
    collective_failure,
    wrap_ddp,
)
from workbench.engine.training.live_bn import freeze_batchnorms, set_training_mode
from workbench.errors import CalibrationError, ConfigError, DistributedError, NonFiniteError


@dataclass
class TrainingLog:
    """What the loop did: one row per completed step, one per completed epoch."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    bn_frozen_at_step: int | None = None


def train_qat(
    model: nn.Module,
    batches_of_epoch: Callable[[], Iterator],
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    eval_fn: Callable[[nn.Module], float] | None = None,
    freeze_bn_after: int = 0,
    steps_per_epoch: int | None = None,
    progress: bool = True,
    job: Job | None = None,
) -> tuple[nn.Module, TrainingLog]:
    """Train ``model`` (fake-quantized, on ``device``) for ``epochs``; returns the model (a new
    object only if the model itself was a live conv-BN) and the log.

    A KeyboardInterrupt ends training cleanly: the log holds the steps completed and
    ``interrupted`` is set; the caller decides what to tell the user.

    In a distributed ``job`` the model trains under DistributedDataParallel (wrapped again
    when BatchNorm is folded, which changes its modules) and ends with rank 0's parameters
    and buffers on every process. An interrupt then stops this process with a
    ``DistributedError`` (the others, waiting for its gradients, fail within the job's
    timeout), since a process leaving the loop alone would desynchronise the job.
    """
    log = TrainingLog()
    bn_frozen = False
    if freeze_bn_after == 0:
        model = freeze_batchnorms(model)
        bn_frozen, log.bn_frozen_at_step = True, 0
    trained = model if job is None else wrap_ddp(model, job, device)
    scales = learned_scales(model)
    total = steps_per_epoch * epochs if steps_per_epoch else None
    bar = tqdm(total=total, desc="QAT", disable=not progress, unit="step")
    step = 0  # steps completed
    try:
        for epoch in range(1, epochs + 1):
            set_training_mode(model, bn_frozen)
            epoch_loss, epoch_steps = 0.0, 0
            for batch in batches_of_epoch():
                if not bn_frozen and step >= freeze_bn_after:
                    model = freeze_batchnorms(model)
                    bn_frozen, log.bn_frozen_at_step = True, step
                    trained = model if job is None else wrap_ddp(model, job, device)
                where = f"at step {step + 1} (epoch {epoch})"
                batch = move_batch(batch, device)
                loss_value = train_step(trained, batch, loss_fn, optimizer, where)
                step += 1
                epoch_loss += loss_value
                epoch_steps += 1
                log.steps.append(
                    {"step": step, "epoch": epoch, "loss": loss_value} | scale_values(scales)
                )
                bar.update(1)
                bar.set_postfix(loss=f"{epoch_loss / epoch_steps:.4f}", refresh=False)
            end_epoch(log, model, eval_fn, epoch, epoch_loss, epoch_steps, bar)
    except KeyboardInterrupt:
        if job is not None:
            raise DistributedError(
                f"rank {job.rank} was interrupted at step {step + 1}; the other processes "
                f"stop with an error within {job.timeout_s:g} s",
                code="distributed.interrupted",
            ) from None
        log.interrupted = True
    except COLLECTIVE_ERRORS as exc:
        failure = None if job is None else collective_failure(exc, job.timeout_s, "training")
        if failure is None:
            raise
        raise failure from exc
    finally:
        bar.close()
    if job is not None:
        broadcast_model(model, job)
    return model, log


def train_step(
    model: nn.Module, batch: Any, loss_fn: Callable, optimizer: torch.optim.Optimizer, where: str
) -> float:
    """One optimizer step on ``batch``; the loss, checked to be one finite number (``where``:
    the step, for the error)."""
    optimizer.zero_grad(set_to_none=True)
    loss = forward_loss(model, batch, loss_fn)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)
        raise ConfigError(
            f"loss_fn returned {shape} {where}, not a scalar tensor; return one value, e.g. "
            "reduce it with .mean()"
        )
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        raise NonFiniteError(
            f"the loss became {loss_value} {where}; lower lr or check train_data and loss_fn"
        )
    loss.backward()
    optimizer.step()
    return loss_value


def end_epoch(
    log: TrainingLog,
    model: nn.Module,
    eval_fn: Callable[[nn.Module], float] | None,
    epoch: int,
    epoch_loss: float,
    epoch_steps: int,
    bar: Any,
) -> None:
    """The epoch's row of the log (mean loss, ``eval_fn``'s metric when given)."""
    if epoch_steps == 0:
        raise CalibrationError(
            f"train_data yielded 0 batches in epoch {epoch}; pass a DataLoader or a "
            "list of batches that can be iterated once per epoch"
        )
    metric = None
    if eval_fn is not None:
        metric = measure_metric(eval_fn, model, f"the model after epoch {epoch}")
        log.steps[-1]["metric"] = metric
        bar.set_postfix(
            loss=f"{epoch_loss / epoch_steps:.4f}", metric=f"{metric:.4g}", refresh=False
        )
    mean_loss = epoch_loss / epoch_steps
    log.epochs.append(
        {"epoch": epoch, "steps": epoch_steps, "mean_loss": mean_loss, "metric": metric}
    )
