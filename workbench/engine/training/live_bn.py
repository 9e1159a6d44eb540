"""BatchNorm kept live during the first QAT steps, then folded for good.

By default (``freeze_bn_after=0``) BN is folded into the conv before training, from the running
statistics the model already has, exactly as PTQ folds it: the folded conv is what QAT trains
and what ONNX export writes, and BN statistics cannot drift from the weights they were folded
into. With ``freeze_bn_after=N`` the recipe of PyTorch's ``ConvBn`` QAT modules (Jacob et al.,
2018; TensorRT's QAT guide) is used for the first N steps: the weight is quantized folded with
the running statistics, ``Q(W * gamma / sigma_running)``, the conv output is un-scaled and
normalized with the batch statistics (which keep updating the running ones); then BN is frozen
and folded into the conv for good. In eval mode the layer computes the folded conv exactly,
before and after freezing.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.engine.capture.bn_fold import BN_TYPES, bn_fold_factor, bn_folded_bias, fold_bn_into
from workbench.engine.capture.modules import get_layer, set_submodule
from workbench.engine.capture.prepare import LayerPlan
from workbench.engine.placement.layers import QuantizedLayer


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
        return bn_fold_factor(self.bn)

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
            y = y + bn_folded_bias(self.bn, bias, factor).reshape(view)
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
