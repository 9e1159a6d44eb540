"""Turn the quantization of individual layers on and off in a calibrated model.

Used to measure sensitivity: one calibration, then each layer quantized alone or left out,
without calibrating again.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from workbench.engine.placement.layers import QuantizedLayer, iter_quantized_layers
from workbench.engine.quantizers.modules import OFF, QUANTIZE, ActivationQuantizer


def set_layer_quantized(layer: QuantizedLayer, quantized: bool) -> None:
    """Quantize ``layer`` (weights and input) or let it compute in FP32."""
    layer.weight_quantizer.enabled = quantized
    for quantizer in [layer.input_quantizer, *getattr(layer, "call_input_quantizers", ())]:
        if quantizer is not None:
            quantizer.mode = QUANTIZE if quantized else OFF


def quantize_only(model: nn.Module, names: Iterable[str], between_layers: bool = True) -> None:
    """Quantize exactly the layers called ``names``; every other quantized layer runs FP32.

    ``between_layers`` switches the activation quantizers that belong to no single layer
    (those placed on tensors between layers, e.g. a ReLU's output that ONNX Runtime needs
    quantized for its integer kernels): on for what will be deployed, off to measure one
    layer by itself.
    """
    chosen = set(names)
    inside_layers: set[int] = set()
    for name, layer in iter_quantized_layers(model):
        set_layer_quantized(layer, name in chosen)
        inside_layers.update(id(m) for m in layer.modules())
    for module in model.modules():
        outside = isinstance(module, ActivationQuantizer) and id(module) not in inside_layers
        if outside and module.calibrated:
            module.mode = QUANTIZE if between_layers else OFF
