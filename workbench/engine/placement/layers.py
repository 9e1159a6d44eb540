"""QuantizedLayer: a Linear / Conv wrapped with an input and a weight quantizer.

The wrapped FP32 module is kept as ``.layer`` (its parameters are the ones trained by QAT and
exported); the wrapper only changes what the forward pass computes:
    y = op(Q_act(x), Q_w(W), b)

It stands in for the module it replaces: library forwards read the layer's attributes
(transformers' MobileNet and Whisper compute TF-style padding from ``conv.stride`` and
``conv.padding``; heads read ``out_features``), so every attribute the wrapper does not have
itself reads through to the wrapped module. One the wrapped module lacks too raises
:class:`StandInAttributeError`, which names the layer and the wrapper (never the data).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.engine.calibration.batches import run_model
from workbench.engine.capture.modules import hooks_removed
from workbench.engine.quantizers.modules import ActivationQuantizer, WeightQuantizer
from workbench.errors import WorkbenchError


def smoothed_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` times the layer's SmoothQuant ``input_scale`` when it has one
    (``engine.algorithms.smoothquant.SmoothedLinear``), for code that uses the weight without the
    layer's forward."""
    scale = getattr(layer, "input_scale", None)
    return x if scale is None else x * scale


class StandInAttributeError(WorkbenchError, AttributeError):
    """An attribute that neither a quantized layer's wrapper nor the module it wraps has (an
    ``AttributeError`` still, so ``hasattr`` and ``getattr(..., default)`` work)."""


class LayerWeights:
    """``weight`` and ``bias`` properties (models read ``layer.weight``, its dtype): those of
    the wrapped ``self.layer``, or whatever ``weight_and_bias`` gives in a subclass."""

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.layer.weight, self.layer.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_and_bias()[0]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.weight_and_bias()[1]


class StandsIn(nn.Module):
    """A module that stands in for another (``stands_in_for()``): any attribute it does not
    have itself reads through to that module (module docstring)."""

    layer_name: str

    def stands_in_for(self) -> nn.Module | None:
        return self.__dict__.get("_modules", {}).get("layer")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of its own
        except AttributeError:
            pass
        layer = self.stands_in_for()
        if layer is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            return getattr(layer, name)
        except AttributeError:
            layer_name = self.__dict__.get("layer_name")
            raise StandInAttributeError(
                f"the model reads {name!r} of layer {layer_name!r}, which neither the "
                f"workbench's {type(self).__name__} nor the {type(layer).__name__} it wraps "
                f"has; keep the layer FP32 with QuantConfig(exclude=[{layer_name!r}])"
            ) from None


class QuantizedLayer(LayerWeights, StandsIn):
    """Simulates a quantized Linear / Conv: fake-quantized input and weight, FP32 bias."""

    def __init__(
        self,
        layer: nn.Module,
        name: str,
        weight_quantizer: WeightQuantizer,
        input_quantizer: ActivationQuantizer | None,
        output_quantizer: ActivationQuantizer | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.layer_name = name
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        # set by engine.placement.graph_quantizers when nothing after the layer can hold it (see
        # there)
        self.output_quantizer = output_quantizer

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the quantized model sees it (dequantized codes)."""
        return self.weight_quantizer(self.layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = smoothed_input(self.layer, x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        out = None
        if isinstance(self.layer, nn.Linear):  # a large weight: dequantized a block at a time
            out = self.weight_quantizer.linear_in_blocks(x, self.layer.weight, self.layer.bias)
        if out is None:
            weight = self.weight_quantizer(self.layer.weight)
            if isinstance(self.layer, nn.Linear):
                out = F.linear(x, weight, self.layer.bias)
            else:
                out = self.layer._conv_forward(x, weight, self.layer.bias)
        if self.output_quantizer is not None:
            out = self.output_quantizer(out)
        return out

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}"


class QuantizedEmbedding(QuantizedLayer):
    """Simulates an embedding table stored as integers (weight-only): rows of Q_w(W).

    The table has no bias; ``bias`` is registered as ``None`` on it so that code reading
    ``layer.bias`` treats it like a bias-free Linear.
    """

    def __init__(self, layer: nn.Embedding, name: str, weight_quantizer: WeightQuantizer) -> None:
        if "bias" not in layer._parameters:
            layer.register_parameter("bias", None)
        super().__init__(layer, name, weight_quantizer, None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.layer
        return F.embedding(
            ids,
            self.weight_quantizer(table.weight),
            table.padding_idx,
            table.max_norm,
            table.norm_type,
            table.scale_grad_by_freq,
            table.sparse,
        )


def iter_quantized_layers(model: nn.Module):
    """Yield ``(name, QuantizedLayer)`` pairs of a quantized model in definition order."""
    for module in model.modules():
        if isinstance(module, QuantizedLayer):
            yield module.layer_name, module


def quantized_layer_calls(model: nn.Module, batch: Any) -> list[str]:
    """The quantized layers of ``model`` in the order one forward pass on ``batch`` calls them
    (a layer called twice is listed twice)."""
    calls: list[str] = []
    handles = [
        layer.register_forward_pre_hook(lambda module, args: calls.append(module.layer_name))
        for _, layer in iter_quantized_layers(model)
    ]
    with hooks_removed(handles), torch.no_grad():
        run_model(model, batch)
    return calls
