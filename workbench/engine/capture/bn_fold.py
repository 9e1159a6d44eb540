"""Fold BatchNorm into the convolution (or Linear) that feeds it.

    W' = W * gamma / sqrt(var + eps)          (per output channel)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

Pairs are found from the data flow of one real forward pass (the BatchNorm's input is the very
tensor the conv returned), so it works for any model, whatever its forward does, and never
folds a BatchNorm that is not applied to the conv's output. A fold must also leave the model's
output unchanged on that batch: where the conv's output has another consumer too (a residual
``bn(y) + y``), folding would change what that consumer sees, so such a fold is undone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workbench.engine.calibration.batches import output_tensor, run_model
from workbench.engine.capture.modules import hooks_removed, set_submodule, writable

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FOLDABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def find_conv_bn_pairs(model: nn.Module, batch: Any) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` pairs where the BN consumes the conv's output directly."""
    # The outputs are kept alive for the whole pass: a freed tensor's id can be reused by a
    # later tensor, which would then pass for the conv's output.
    producers: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    handles = []
    names = {module: name for name, module in model.named_modules()}

    def on_foldable(module, inputs, output):
        if isinstance(output, torch.Tensor):
            producers[id(output)] = (names[module], output)

    def on_bn(module, inputs, output):
        source = inputs[0] if inputs else None
        if isinstance(source, torch.Tensor) and id(source) in producers:
            pairs.append((producers[id(source)][0], names[module]))

    for module in model.modules():
        if isinstance(module, BN_TYPES):
            handles.append(module.register_forward_hook(on_bn))
        elif isinstance(module, FOLDABLE_TYPES):
            handles.append(module.register_forward_hook(on_foldable))
    with hooks_removed(handles), torch.no_grad():
        run_model(model, batch)
    # A conv or BN applied more than once (a shared module) cannot be folded.
    conv_counts: dict[str, int] = {}
    bn_counts: dict[str, int] = {}
    for conv, bn in pairs:
        conv_counts[conv] = conv_counts.get(conv, 0) + 1
        bn_counts[bn] = bn_counts.get(bn, 0) + 1
    unique = []
    for conv, bn in pairs:
        if conv_counts[conv] == 1 and bn_counts[bn] == 1 and (conv, bn) not in unique:
            unique.append((conv, bn))
    return unique


def bn_fold_factor(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)``, one per channel: what the weight is scaled by."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    return gamma / std


def bn_folded_bias(
    bn: nn.modules.batchnorm._BatchNorm, bias: torch.Tensor | None, factor: torch.Tensor
) -> torch.Tensor:
    """``(b - running_mean) * factor + beta``: the bias of the folded layer."""
    if bias is None:
        bias = torch.zeros_like(bn.running_mean)
    beta = bn.bias if bn.affine else torch.zeros_like(factor)
    return (bias - bn.running_mean) * factor + beta


def bn_output_statistics(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(beta, |gamma|)`` per channel: the mean and std of the BatchNorm's output where its
    input follows its running statistics, i.e. of the folded layer's output. Analytic bias
    correction takes the output to be Gaussian with them (Nagel et al. 2019, section 4.2)."""
    channels = bn.num_features
    beta = bn.bias if bn.affine else torch.zeros(channels)
    gamma = bn.weight if bn.affine else torch.ones(channels)
    return beta.detach().clone().float(), gamma.detach().abs().float()


def fold_bn_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` (eval statistics) into ``layer``'s weight and bias, in place."""
    with torch.no_grad():
        factor = bn_fold_factor(bn)
        new_bias = bn_folded_bias(bn, layer.bias, factor)
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        writable(layer, "weight").mul_(factor.reshape(shape))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.detach().clone())
        else:
            writable(layer, "bias").copy_(new_bias)


def _reference_output(model: nn.Module, batch: Any) -> torch.Tensor | None:
    with torch.no_grad():
        output = output_tensor(run_model(model, batch))
    return None if output is None else output.detach().clone()


def outputs_match(reference: torch.Tensor | None, output: torch.Tensor | None) -> bool:
    """Whether a fold left the model's output unchanged (up to float rounding)."""
    if reference is None or output is None:
        return reference is None and output is None
    if reference.shape != output.shape:
        return False
    tolerance = 1e-4 * float(reference.abs().max()) + 1e-6
    return float((reference - output).abs().max()) <= tolerance


def fold_batchnorms(model: nn.Module, batch: Any) -> dict[str, str]:
    """Fold every BN that directly follows a conv / linear; returns ``{bn_name: conv_name}``.

    Folded BNs are replaced by ``nn.Identity`` in ``model`` (which must be in eval mode). A fold
    that changes the model's output on ``batch`` (the conv's output also feeds something
    else) is undone.
    """
    pairs = []
    for conv_name, bn_name in find_conv_bn_pairs(model, batch):
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        if bn.running_mean is None or conv.weight.shape[0] != bn.num_features:
            continue
        pairs.append((conv_name, bn_name))
    if not pairs:
        return {}
    reference = _reference_output(model, batch)
    saved = {bn_name: _FoldUndo(model, conv_name, bn_name) for conv_name, bn_name in pairs}
    for conv_name, bn_name in pairs:
        _fold_pair(model, conv_name, bn_name)
    if outputs_match(reference, _reference_output(model, batch)):
        return {bn_name: conv_name for conv_name, bn_name in pairs}
    # Some fold changed the output: undo them all, then fold one pair at a time, keeping
    # only the folds that leave the output as it was.
    for _, bn_name in pairs:
        saved[bn_name].undo(model)
    folded: dict[str, str] = {}
    for conv_name, bn_name in pairs:
        _fold_pair(model, conv_name, bn_name)
        if outputs_match(reference, _reference_output(model, batch)):
            folded[bn_name] = conv_name
        else:
            saved[bn_name].undo(model)
    return folded


def _fold_pair(model: nn.Module, conv_name: str, bn_name: str) -> None:
    fold_bn_into(model.get_submodule(conv_name), model.get_submodule(bn_name))
    set_submodule(model, bn_name, nn.Identity())


class _FoldUndo:
    """What a fold changes (the conv's weight and bias, the BN module), to put it back."""

    def __init__(self, model: nn.Module, conv_name: str, bn_name: str) -> None:
        conv = model.get_submodule(conv_name)
        self.conv_name, self.bn_name = conv_name, bn_name
        self.bn = model.get_submodule(bn_name)
        self.weight = conv.weight.detach().clone()
        self.bias = None if conv.bias is None else conv.bias.detach().clone()

    def undo(self, model: nn.Module) -> None:
        conv = model.get_submodule(self.conv_name)
        with torch.no_grad():
            writable(conv, "weight").copy_(self.weight)
            if self.bias is None:
                conv.bias = None
            else:
                writable(conv, "bias").copy_(self.bias)
        set_submodule(model, self.bn_name, self.bn)
