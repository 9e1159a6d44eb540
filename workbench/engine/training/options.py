"""QAT's options, checked before anything runs: loss, epochs, lr, optimizer, device
(:class:`TrainingOptions`).

Each option that cannot train fails with one clear error naming the fix; the loss function is
tried once on the first batch (no update) so that a loss without a gradient fails before the
first step rather than deep inside the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import nn

from workbench.engine.calibration.batches import loss_target, run_model
from workbench.errors import ConfigError, WorkbenchError, first_line


def check_loss_fn(loss_fn: Any) -> None:
    """One clear error when ``loss_fn`` cannot be called."""
    if loss_fn is None or not callable(loss_fn):
        raise ConfigError(
            "qat needs loss_fn(output, target) -> scalar tensor; pass e.g. "
            "loss_fn=torch.nn.CrossEntropyLoss()"
        )


@dataclass(frozen=True)
class TrainingOptions:
    """How QAT trains (``wb.qat``'s keywords of the same names), checked on creation: one
    clear error for each option that cannot train, before anything runs."""

    epochs: int = 1
    lr: float = 1e-4
    optimizer: Callable[..., torch.optim.Optimizer] | None = None
    device: str | torch.device | None = None
    learn_scales: bool = False
    freeze_bn_after: int = 0

    def __post_init__(self) -> None:
        epochs, lr, optimizer = self.epochs, self.lr, self.optimizer
        if isinstance(epochs, bool) or not isinstance(epochs, Integral) or epochs < 1:
            raise ConfigError(f"epochs must be an int >= 1, got {epochs!r}")
        if isinstance(lr, bool) or not isinstance(lr, Real) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"lr must be a number > 0, got {lr!r}; QAT fine-tunes with e.g. 1e-4")
        if isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                "optimizer must be an optimizer class or factory (e.g. torch.optim.SGD or "
                "functools.partial(torch.optim.SGD, momentum=0.9)), not an instance: qat "
                "trains a copy of the model, so an optimizer bound to model.parameters() "
                "cannot drive it"
            )
        if optimizer is not None and not callable(optimizer):
            raise ConfigError(
                f"optimizer must be an optimizer class or factory, got {type(optimizer).__name__}"
            )
        steps = self.freeze_bn_after
        if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 0:
            raise ConfigError(
                f"freeze_bn_after must be an int >= 0 (training steps), got {steps!r}"
            )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """CPU by default; a clear error when an accelerator is asked for and absent."""
    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; pass 'cpu' or 'cuda'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={str(device)!r} was asked for but CUDA is not available "
            "(torch.cuda.is_available() is False); pass device='cpu' or install a CUDA build "
            "of PyTorch"
        )
    return resolved


def build_optimizer(
    optimizer: Callable[..., torch.optim.Optimizer] | None,
    model: nn.Module,
    lr: float,
) -> torch.optim.Optimizer:
    """``optimizer(param_groups, lr=lr)``; default Adam. Learned scales get their own group."""
    scales, weights = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (scales if name.endswith("quantizer.scale") else weights).append(param)
    if not weights and not scales:
        raise ConfigError(
            "the model has no trainable parameter (every requires_grad is False); "
            "unfreeze the layers QAT should fine-tune"
        )
    groups: list[dict[str, Any]] = [{"params": weights}] if weights else []
    if optimizer is None:
        # Adam moves a parameter by about lr per step whatever its gradient's size: the same
        # lr as the weights would move a scale of 0.01 by 10% a step. Each scale gets lr
        # relative to its calibrated size instead.
        for scale in scales:
            size = float(scale.detach().abs().mean())
            groups.append({"params": [scale], "lr": lr * size})
        return torch.optim.Adam(groups, lr=lr)
    if scales:
        groups.append({"params": scales})
    return optimizer(groups, lr=lr)


def check_loss(model: nn.Module, batch: Any, loss_fn: Callable) -> None:
    """Run the first batch once (no update) and fail clearly unless the loss is a scalar
    tensor with a gradient. Eval mode, so no BatchNorm statistic moves."""
    was_training = model.training
    model.eval()
    try:
        output = run_model(model, batch, 0, "train_data")
        target = loss_target(batch, model)
        try:
            loss = loss_fn(output, target)
        except WorkbenchError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as exc:
            raise ConfigError(
                f"loss_fn failed on the first batch ({first_line(exc)}); it is called as "
                "loss_fn(output, targets) for (inputs, targets) batches and "
                "loss_fn(output, batch) for dict batches"
            ) from exc
    finally:
        model.train(was_training)
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(
            f"loss_fn returned {type(loss).__name__}, not a tensor; return a scalar "
            "torch.Tensor computed from the output (no .item())"
        )
    if loss.numel() != 1:
        raise ConfigError(
            f"loss_fn returned a tensor of shape {list(loss.shape)}; return a scalar, "
            "e.g. reduce it with .mean()"
        )
    if not loss.is_floating_point() or not loss.requires_grad:
        raise ConfigError(
            "the loss has no gradient with respect to the model; compute it from the model "
            "output without .detach(), .item() or torch.no_grad()"
        )
