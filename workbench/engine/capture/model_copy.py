"""The workbench's own copy of the user's model: checked (a module, no lazy or NaN weights),
deep-copied in eval mode, with weight parametrizations (weight_norm, spectral_norm,
``torch.nn.utils.parametrize``) resolved into plain weights; the user's model is never
modified."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import (
    SpectralNorm,
    SpectralNormLoadStateDictPreHook,
    SpectralNormStateDictHook,
)
from torch.nn.utils.weight_norm import WeightNorm

from workbench.core.qparams import check_finite
from workbench.engine.capture.modules import shared_copy
from workbench.errors import ModelError

# modules whose output depends on the training flag (the ones eval mode switches)
MODE_DEPENDENT_TYPES = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def check_model(model: Any) -> None:
    """A clear error for anything that is not a usable nn.Module."""
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            f"the model is a TorchScript module ({type(model).__name__}, from torch.jit.script "
            "or torch.jit.trace), whose layers cannot be replaced by quantized ones; pass the "
            "original nn.Module"
        )
    lazy = [name for name, tensor in model.named_parameters() if is_lazy(tensor)]
    lazy += [name for name, tensor in model.named_buffers() if is_lazy(tensor)]
    if lazy:
        raise ModelError(
            f"{lazy[0]!r} of the model is not materialized yet (a lazy module such as "
            "nn.LazyLinear); run one batch through the model first: model(example_batch)"
        )
    doubles = [name for name, tensor in model.named_parameters() if tensor.dtype == torch.float64]
    if doubles:
        raise ModelError(
            f"the model is float64 ({doubles[0]!r}); the quantized model and ONNX Runtime's "
            "integer kernels take float32: pass model.float() and float32 data (x.float())"
        )
    tensors = [*model.named_parameters(), *model.named_buffers()]
    meta = [name for name, tensor in tensors if tensor.is_meta]
    if meta:
        raise ModelError(
            f"{meta[0]!r} of the model is on the meta device (no values to quantize); "
            "materialize it first: model.to_empty(device='cpu') then load_state_dict(...)"
        )
    for name, param in model.named_parameters():
        check_finite(param.detach(), f"parameter {name!r} of the model")
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():  # BatchNorm statistics end up in the folded weights
            check_finite(buffer.detach(), f"buffer {name!r} of the model")


def user_model_copy(model: Any, caller: str, share_weights: bool = False) -> nn.Module:
    """The copy of the user's model that every internal forward runs on: checked, in eval
    mode, ``torch.compile``'s wrapper removed, parametrizations (weight norm) replaced by the
    weights they compute. The user's model is never run, moved or switched to eval.

    ``share_weights`` (PTQ): the copy's modules are new but its parameters are the user's
    tensors, read and never written (``modules.shared_copy``, ``modules.writable``), so a
    large model is not held twice; QAT, which trains the copy, takes a deep copy.

    A model in training mode (dropout / BatchNorm layers) gets a warning: the FP32 metric, the
    BN folding and the calibration use eval mode (dropout off, BatchNorm's running
    statistics), as inference does.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps the module
    check_model(model)
    training = [
        name
        for name, module in model.named_modules()
        if module.training and isinstance(module, MODE_DEPENDENT_TYPES)
    ]
    if training:
        more = f" and {len(training) - 1} more" if len(training) > 1 else ""
        warnings.warn(
            f"{caller}: the model is in training mode ({training[0]!r}{more} would use "
            "dropout / batch statistics); it is quantized and measured in eval mode, on a copy "
            "(your model is untouched); call model.eval() first to silence this warning",
            UserWarning,
            stacklevel=3,
        )
    try:
        copied = shared_copy(model, share_buffers=False) if share_weights else copy.deepcopy(model)
    except Exception as exc:  # a module holding a lock, a generator, an open file, ...
        raise ModelError(
            f"the model cannot be copied ({type(exc).__name__}: {exc}); the workbench "
            "quantizes a deep copy and never the model itself: make it copy.deepcopy-able"
        ) from exc
    resolve_parametrizations(copied)
    return copied.eval()


def resolve_parametrizations(model: nn.Module) -> None:
    """Replace every parametrized tensor of ``model`` (a copy) by the tensor it computes now:
    ``parametrize`` ones (weight norm on any ``dim``, spectral norm, orthogonal) and the older
    forward-pre-hook ones (``torch.nn.utils.weight_norm`` / ``spectral_norm``).

    Nothing is shared with the model it was copied from: ``remove_parametrizations`` would
    delete the property from the dynamically created class (``ParametrizedConv1d``) that a
    deep copy shares with the original, leaving the user's module without its ``weight``
    (transformers' Wav2Vec2 / HuBERT positional conv). Here the copy only gets back its
    original class and a new parameter; the class is never edited.
    """
    with torch.no_grad():
        for module in model.modules():
            if parametrize.is_parametrized(module):
                values = {}
                for tensor_name, chain in module.parametrizations.items():
                    value = getattr(module, tensor_name).detach().clone()
                    trainable = any(
                        isinstance(p, nn.Parameter) and p.requires_grad for p in chain.parameters()
                    )
                    values[tensor_name] = (value, trainable)
                del module._modules["parametrizations"]
                module.__class__ = type(module).__bases__[0]
                for tensor_name, (value, trainable) in values.items():
                    module._parameters.pop(tensor_name, None)
                    module._buffers.pop(tensor_name, None)
                    module.register_parameter(
                        tensor_name, nn.Parameter(value, requires_grad=trainable)
                    )
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, WeightNorm | SpectralNorm):
                    value = hook.compute_weight(module, **_no_power_iteration(hook))
                    del module._forward_pre_hooks[key]
                    for suffix in _HOOK_TENSORS[type(hook)]:
                        module._parameters.pop(hook.name + suffix, None)
                        module._buffers.pop(hook.name + suffix, None)
                    if hook.name in module.__dict__:
                        delattr(module, hook.name)
                    module.register_parameter(hook.name, nn.Parameter(value.detach().clone()))
            for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
                for key, hook in list(hooks.items()):
                    if isinstance(getattr(hook, "hook", hook), _SPECTRAL_STATE_HOOKS):
                        del hooks[key]


_SPECTRAL_STATE_HOOKS = (SpectralNormStateDictHook, SpectralNormLoadStateDictPreHook)

_HOOK_TENSORS = {WeightNorm: ("_g", "_v"), SpectralNorm: ("_orig", "_u", "_v")}


def _no_power_iteration(hook) -> dict:
    """Spectral norm's weight from its stored vectors (as in eval mode), without the power
    iteration that would update them."""
    return {"do_power_iteration": False} if isinstance(hook, SpectralNorm) else {}
