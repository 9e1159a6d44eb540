"""The quantizers while QAT trains, and at its end.

After PTQ calibration (``engine.calibration.calibrate``) the model is switched to training:

* weights are fake-quantized with the STE, their qparams recomputed from the weight at every
  step (minmax / MSE, as calibration did), or learned (LSQ) when ``learn_scales``;
* activations are fake-quantized with the calibrated scale and zero point (or an LSQ-learned
  scale), so the model trains against exactly the rounding it will be exported with.

At the end, learned scales are fixed, weight qparams frozen from the final weights and biases
rounded to their INT32 grid, as the export writes them.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.engine.placement.graph_quantizers import round_bias
from workbench.engine.placement.layers import QuantizedLayer, iter_quantized_layers
from workbench.engine.quantizers.modules import OFF, QUANTIZE, ActivationQuantizer, scale_source
from workbench.engine.training.live_bn import QuantizedConvBn, freeze_batchnorms


def enable_qat(model: nn.Module, learn_scales: bool) -> None:
    """Weight qparams follow the weight at every step, or every scale becomes an LSQ
    parameter when ``learn_scales``: weights per channel, activation quantizers (layer inputs
    and outputs) per tensor.

    An input quantizer that shares the scale of the output quantizer feeding it
    (``shares_scale_of``, set by ``engine.placement.graph_quantizers``) receives values already on
    its
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
        if scale_source(model, quantizer) is not None:
            quantizer.mode = OFF
        elif learn_scales:
            quantizer.enable_learned_scale()


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
        source = scale_source(model, module) if isinstance(module, ActivationQuantizer) else None
        if source is not None and module.mode == OFF:
            module.share_qparams_of(source)
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
