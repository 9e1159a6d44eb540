"""QAT steps on a calibrated model: training mode, BatchNorm folding while training, the loop.

After PTQ calibration (``engine.calibrate``) the model is switched to training:

* weights are fake-quantized with the STE, their qparams recomputed from the weight at every
  step (minmax / MSE, as calibration did), or learned (LSQ) when ``learn_scales``;
* activations are fake-quantized with the calibrated scale and zero point (or an LSQ-learned
  scale), so the model trains against exactly the rounding it will be exported with.

BatchNorm (what is trained is what is exported). By default (``freeze_bn_after=0``) BN is folded
into the conv before training, from the running statistics the model already has, exactly as
PTQ folds it: the folded conv is what QAT trains and what ONNX export writes, and BN statistics
cannot drift from the weights they were folded into. With ``freeze_bn_after=N`` the recipe of
PyTorch's ``ConvBn`` QAT modules (Jacob et al., 2018; TensorRT's QAT guide) is used for the
first N steps: the weight is quantized folded with the running statistics,
``Q(W * gamma / sigma_running)``, the conv output is un-scaled and normalized with the batch
statistics (which keep updating the running ones); then BN is frozen and folded into the conv
for good. In eval mode the layer computes the folded conv exactly, before and after freezing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from numbers import Integral, Real
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.engine.batches import model_inputs
from workbench.engine.bn_fold import BN_TYPES, fold_bn_into, set_submodule
from workbench.engine.graph_quantizers import round_bias
from workbench.engine.layers import QuantizedLayer, iter_quantized_layers
from workbench.engine.prepare import LayerPlan, get_layer
from workbench.engine.quantizers import OFF, QUANTIZE, ActivationQuantizer
from workbench.errors import CalibrationError, ConfigError, NonFiniteError, WorkbenchError


# options ---------------------------------------------------------------------------------------
def check_training_options(
    loss_fn: Any, epochs: Any, lr: Any, optimizer: Any, freeze_bn_after: Any
) -> None:
    """One clear error for each option that cannot train, before anything runs."""
    if loss_fn is None or not callable(loss_fn):
        raise ConfigError(
            "qat needs loss_fn(output, target) -> scalar tensor; pass e.g. "
            "loss_fn=torch.nn.CrossEntropyLoss()"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, Integral) or epochs < 1:
        raise ConfigError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, Real) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a number > 0, got {lr!r}; QAT fine-tunes with e.g. 1e-4")
    if isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            "optimizer must be an optimizer class or factory (e.g. torch.optim.SGD or "
            "functools.partial(torch.optim.SGD, momentum=0.9)), not an instance: qat trains a "
            "copy of the model, so an optimizer bound to model.parameters() cannot drive it"
        )
    if optimizer is not None and not callable(optimizer):
        raise ConfigError(
            f"optimizer must be an optimizer class or factory, got {type(optimizer).__name__}"
        )
    if (
        isinstance(freeze_bn_after, bool)
        or not isinstance(freeze_bn_after, Integral)
        or freeze_bn_after < 0
    ):
        raise ConfigError(
            f"freeze_bn_after must be an int >= 0 (training steps), got {freeze_bn_after!r}"
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


# batches ---------------------------------------------------------------------------------------
def loss_target(batch: Any) -> Any:
    """What ``loss_fn`` receives next to the output: ``targets`` of an ``(inputs, targets)``
    batch, or the whole batch when it is a dict (``loss_fn(output, batch)``)."""
    if isinstance(batch, dict):
        return batch
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[1]
    raise CalibrationError(
        f"train_data yielded a batch of type {_describe(batch)}; yield (inputs, targets) "
        "tuples (e.g. a DataLoader of a TensorDataset(x, y)) or dicts for loss_fn(output, batch)"
    )


def _describe(batch: Any) -> str:
    if isinstance(batch, list | tuple):
        return f"{type(batch).__name__} of {len(batch)} item(s)"
    return type(batch).__name__


def move_batch(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (tuples, lists, dicts)."""
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return type(batch)({k: move_batch(v, device) for k, v in batch.items()})
    if isinstance(batch, list | tuple):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def forward_loss(model: nn.Module, batch: Any, loss_fn: Callable) -> torch.Tensor:
    """``loss_fn(model(inputs), target)`` for one (already moved) batch."""
    args, kwargs = model_inputs(batch)
    output = model(*args, **kwargs)
    return loss_fn(output, loss_target(batch))


def check_loss(model: nn.Module, batch: Any, loss_fn: Callable) -> None:
    """Run the first batch once (no update) and fail clearly unless the loss is a scalar
    tensor with a gradient. Eval mode, so no BatchNorm statistic moves."""
    was_training = model.training
    model.eval()
    try:
        args, kwargs = model_inputs(batch)
        try:
            output = model(*args, **kwargs)
        except WorkbenchError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise CalibrationError(
                f"the first batch of train_data could not run through the model "
                f"({_first_line(exc)}); pass batches shaped like the model's input"
            ) from exc
        target = loss_target(batch)
        try:
            loss = loss_fn(output, target)
        except WorkbenchError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as exc:
            raise ConfigError(
                f"loss_fn failed on the first batch ({_first_line(exc)}); it is called as "
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def epoch_batches(train_data: Any, first_batches: list[Any], epochs: int) -> Callable[[], Iterator]:
    """A function returning one epoch's batches. A one-shot iterator (a generator) can feed
    one epoch only: the batches already taken for calibration are chained back in front."""
    if isinstance(train_data, dict):
        return lambda: iter([train_data])
    if not isinstance(train_data, Iterable):
        raise CalibrationError(
            f"train_data of type {type(train_data).__name__} is not iterable; pass a "
            "DataLoader or a list of (inputs, targets) batches"
        )
    if isinstance(train_data, Iterator):
        if epochs > 1:
            raise ConfigError(
                "train_data is a one-shot iterator and cannot be read again for a second "
                "epoch; pass a DataLoader or a list of batches, or epochs=1"
            )
        pending = [chain(first_batches, train_data)]
        return lambda: pending.pop() if pending else iter(())
    return lambda: iter(train_data)


def take_first_batches(train_data: Any, count: int) -> list[Any]:
    """The first ``count`` batches of ``train_data`` (calibration, and the loss check)."""
    if isinstance(train_data, torch.Tensor):
        raise CalibrationError(
            "train_data is a single tensor, which has no targets for loss_fn; pass a "
            "DataLoader of (inputs, targets), e.g. DataLoader(TensorDataset(x, y))"
        )
    if isinstance(train_data, dict):
        return [train_data]
    if not isinstance(train_data, Iterable):
        raise CalibrationError(
            f"train_data of type {type(train_data).__name__} is not iterable; pass a "
            "DataLoader or a list of (inputs, targets) batches"
        )
    batches = []
    for batch in train_data:
        batches.append(batch)
        if len(batches) >= count:
            break
    if not batches:
        raise CalibrationError(
            "train_data yielded 0 batches; pass a DataLoader or a non-empty list of "
            "(inputs, targets) batches"
        )
    return batches


# BatchNorm while training ----------------------------------------------------------------------
class QuantizedConvBn(QuantizedLayer):
    """A quantized conv / linear with its BatchNorm kept live during QAT (BN not yet frozen).

    training:  y = BN_batch(op(x, Q(W * f)) / f + b),   f = gamma / sqrt(running_var + eps)
    eval:      y = op(x, Q(W * f)) + (b - running_mean) * f + beta       (the folded layer)
    The weight seen by the quantizer is always the folded one, so its qparams are those the
    exported (folded) model uses.
    """

    def __init__(self, base: QuantizedLayer, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__(
            base.layer,
            base.layer_name,
            base.weight_quantizer,
            base.input_quantizer,
            base.output_quantizer,
        )
        self.bn = bn

    def fold_factor(self) -> torch.Tensor:
        std = torch.sqrt(self.bn.running_var + self.bn.eps)
        gamma = self.bn.weight if self.bn.affine else torch.ones_like(std)
        return gamma / std

    def folded_weight(self) -> torch.Tensor:
        factor = self.fold_factor()
        shape = [-1] + [1] * (self.layer.weight.dim() - 1)
        return self.layer.weight * factor.reshape(shape)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.folded_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        factor = self.fold_factor()
        weight = self.weight_quantizer(self.folded_weight())
        if isinstance(self.layer, nn.Linear):
            y = nn.functional.linear(x, weight)
        else:
            y = self.layer._conv_forward(x, weight, None)
        view = [1, -1] + [1] * (y.dim() - 2)
        bias = self.layer.bias
        if self.bn.training:
            y = y / factor.reshape(view)
            if bias is not None:
                y = y + bias.reshape(view)
            y = self.bn(y)
        else:
            if bias is None:
                bias = torch.zeros_like(self.bn.running_mean)
            beta = self.bn.bias if self.bn.affine else torch.zeros_like(factor)
            folded_bias = (bias - self.bn.running_mean) * factor + beta
            y = y + folded_bias.reshape(view)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y

    def fold(self) -> QuantizedLayer:
        """Fold the BN (running statistics) into the layer for good; same parameters."""
        fold_bn_into(self.layer, self.bn)
        return QuantizedLayer(
            self.layer,
            self.layer_name,
            self.weight_quantizer,
            self.input_quantizer,
            self.output_quantizer,
        )


def folded_pairs(plans: list[LayerPlan]) -> list[tuple[str, str]]:
    """``(layer_name, bn_name)`` of the BatchNorms that preparation folded."""
    return [(plan.folded_into, plan.name) for plan in plans if plan.folded_into is not None]


def unfold_batchnorms(model: nn.Module, original: nn.Module, plans: list[LayerPlan]) -> list[str]:
    """Give folded BNs back their live form for the first training steps.

    Each folded quantized layer gets the original (unfolded) weight and bias and a copy of its
    BatchNorm (a zero bias is added when the layer had none, so the optimizer trains the bias
    the fold will produce). Returns the names of the layers changed.
    """
    changed = []
    for layer_name, bn_name in folded_pairs(plans):
        wrapper = get_layer(model, layer_name)
        source_bn = original.get_submodule(bn_name)
        if not isinstance(wrapper, QuantizedLayer) or isinstance(wrapper, QuantizedConvBn):
            continue
        if source_bn.affine and bool((source_bn.weight == 0).any()):
            continue  # a zero gamma cannot be un-scaled: keep this BN folded
        source_layer = original.get_submodule(layer_name)
        layer = wrapper.layer
        with torch.no_grad():
            layer.weight.copy_(source_layer.weight)
            if source_layer.bias is not None:
                layer.bias.copy_(source_layer.bias)
            else:
                layer.bias = nn.Parameter(torch.zeros_like(layer.bias))
        bn = type(source_bn)(
            source_bn.num_features, source_bn.eps, source_bn.momentum, source_bn.affine
        ).to(layer.weight.device)
        bn.load_state_dict(source_bn.state_dict())
        set_submodule(model, layer_name, QuantizedConvBn(wrapper, bn))
        changed.append(layer_name)
    return changed


def freeze_batchnorms(model: nn.Module) -> nn.Module:
    """Fold every live BN into its layer and put the remaining (unfolded) BNs in eval mode.
    Returns the model (a new object only when the model itself was a live conv-BN)."""
    if isinstance(model, QuantizedConvBn):
        model = model.fold()
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedConvBn):
            set_submodule(model, name, module.fold())
    for module in model.modules():
        if isinstance(module, BN_TYPES):
            module.eval()
    return model


def set_training_mode(model: nn.Module, bn_frozen: bool) -> None:
    """``model.train()``, except BatchNorms once their statistics are frozen."""
    model.train()
    if bn_frozen:
        for module in model.modules():
            if isinstance(module, BN_TYPES):
                module.eval()


# quantizers while training ---------------------------------------------------------------------
def enable_qat(model: nn.Module, learn_scales: bool) -> None:
    """Weight qparams follow the weight at every step, or every scale becomes an LSQ
    parameter when ``learn_scales``: weights per channel, activation quantizers (layer inputs
    and outputs) per tensor.

    An input quantizer that shares the scale of the output quantizer feeding it
    (``shares_scale_of``, set by ``engine.graph_quantizers``) receives values already on its
    grid: quantizing them again is an exact no-op, forward (same codes) and backward (STE
    mask of ones). It is switched off while training (fake quantization is the costliest
    part of a QAT step) and given its source's final scale by :func:`finish_qat`.
    """
    for _, layer in iter_quantized_layers(model):
        weight = layer.folded_weight() if isinstance(layer, QuantizedConvBn) else layer.weight
        if learn_scales:
            layer.weight_quantizer.enable_learned_scale(weight.detach())
        else:
            layer.weight_quantizer.frozen = False
    for quantizer in model.modules():
        if not isinstance(quantizer, ActivationQuantizer) or quantizer.mode != QUANTIZE:
            continue
        if _shared_source(model, quantizer) is not None:
            quantizer.mode = OFF
        elif learn_scales:
            quantizer.enable_learned_scale()


def _shared_source(model: nn.Module, quantizer: ActivationQuantizer) -> ActivationQuantizer | None:
    path = getattr(quantizer, "shares_scale_of", None)
    if not path:
        return None
    try:
        source = model.get_submodule(path)
    except AttributeError:
        return None
    return source if isinstance(source, ActivationQuantizer) else None


def finish_qat(model: nn.Module) -> nn.Module:
    """End of training: fold live BNs, fix learned scales, freeze weight qparams from the final
    weights and round biases to their INT32 grid again (what export writes). Returns the model
    in eval mode."""
    model = freeze_batchnorms(model)
    for _, layer in iter_quantized_layers(model):
        wq = layer.weight_quantizer
        if wq.learn_scale:
            wq.fix_learned_scale()
        else:
            wq.freeze(layer.layer.weight)
    for module in model.modules():
        if isinstance(module, ActivationQuantizer) and module.learn_scale:
            module.fix_learned_scale()
    for module in model.modules():
        source = _shared_source(model, module) if isinstance(module, ActivationQuantizer) else None
        if source is not None and module.mode == OFF:
            with torch.no_grad():
                module.scale.copy_(source.scale.reshape(module.scale.shape))
                module.zero_point.copy_(source.zero_point.reshape(module.zero_point.shape))
            module.mode = QUANTIZE
    for _, layer in iter_quantized_layers(model):
        round_bias(layer)
    return model.eval()


def learned_scales(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The learned scale parameters, named ``weight_scale[layer]`` (per channel) and
    ``act_scale[input of layer]`` / ``act_scale[output of module]`` (per tensor)."""
    found = []
    for module in model.modules():
        if isinstance(module, QuantizedLayer) and module.weight_quantizer.learn_scale:
            found.append((f"weight_scale[{module.layer_name}]", module.weight_quantizer.scale))
        elif isinstance(module, ActivationQuantizer) and module.learn_scale:
            found.append((f"act_scale[{module.tensor_name}]", module.scale))
    return found


def scale_values(scales: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """One number per learned scale (the mean of a per-channel one), in one device sync."""
    if not scales:
        return {}
    values = torch.stack([scale.detach().abs().mean() for _, scale in scales]).cpu().tolist()
    return {name: value for (name, _), value in zip(scales, values, strict=True)}


# the loop --------------------------------------------------------------------------------------
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
) -> tuple[nn.Module, TrainingLog]:
    """Train ``model`` (fake-quantized, on ``device``) for ``epochs``; returns the model (a new
    object only if the model itself was a live conv-BN) and the log.

    A KeyboardInterrupt ends training cleanly: the log holds the steps completed and
    ``interrupted`` is set; the caller decides what to tell the user.
    """
    log = TrainingLog()
    bn_frozen = False
    if freeze_bn_after == 0:
        model = freeze_batchnorms(model)
        bn_frozen, log.bn_frozen_at_step = True, 0
    scales = learned_scales(model)
    total = steps_per_epoch * epochs if steps_per_epoch else None
    bar = tqdm(total=total, desc="QAT", disable=not progress, unit="step")
    step = 0
    try:
        for epoch in range(1, epochs + 1):
            set_training_mode(model, bn_frozen)
            epoch_loss, epoch_steps = 0.0, 0
            for batch in batches_of_epoch():
                if not bn_frozen and step >= freeze_bn_after:
                    model = freeze_batchnorms(model)
                    bn_frozen, log.bn_frozen_at_step = True, step
                batch = move_batch(batch, device)
                optimizer.zero_grad(set_to_none=True)
                loss = forward_loss(model, batch, loss_fn)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise NonFiniteError(
                        f"the loss became {loss_value} at step {step + 1} (epoch {epoch}); "
                        "lower lr or check train_data and loss_fn"
                    )
                loss.backward()
                optimizer.step()
                step += 1
                epoch_loss += loss_value
                epoch_steps += 1
                log.steps.append(
                    {"step": step, "epoch": epoch, "loss": loss_value} | scale_values(scales)
                )
                bar.update(1)
                bar.set_postfix(loss=f"{epoch_loss / epoch_steps:.4f}", refresh=False)
            if epoch_steps == 0:
                raise CalibrationError(
                    f"train_data yielded 0 batches in epoch {epoch}; pass a DataLoader or a "
                    "list of batches that can be iterated once per epoch"
                )
            metric = None
            if eval_fn is not None:
                metric = float(eval_fn(model))
                log.steps[-1]["metric"] = metric
                bar.set_postfix(
                    loss=f"{epoch_loss / epoch_steps:.4f}", metric=f"{metric:.4g}", refresh=False
                )
            log.epochs.append(
                {
                    "epoch": epoch,
                    "steps": epoch_steps,
                    "mean_loss": epoch_loss / epoch_steps,
                    "metric": metric,
                }
            )
    except KeyboardInterrupt:
        log.interrupted = True
    finally:
        bar.close()
    return model, log
