"""A quantized layer with weights called at several sites (a shared conv or Linear).

Cloning it per call, as a parameter-free module is (``engine.placement.call_sites.PerCallSite``),
would
duplicate its weight: QAT would train two copies and the file would store two. So the layer
stays one :class:`QuantizedLayerCalls` (one weight, one weight quantizer, one row in the
reports) whose input quantizer is chosen per call: call 0 uses ``input_quantizer``, call n
``call_input_quantizers[n - 1]``. Each call's input can then stay on the grid it arrives on
(the output quantizer of the op before it), with no requantization in between, which ONNX
Runtime's ``DoubleQDQPairsRemover`` would otherwise rewrite, leaving the conv in FP32.

The bias of an integer kernel is stored on the INT32 grid of ``s_input * s_weight``: call 0's
is rounded in place (``graph_quantizers.round_bias``), every later call rounds it on its own
grid as it runs, ``round(b / (s_n * s_w)) * s_n * s_w``, the same arithmetic the export uses to
write that call's INT32 bias. The output quantizers of the calls are keyed by call site in the
root's ``quantization_sites``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workbench.engine.placement.call_sites import CountsCalls
from workbench.engine.placement.layers import QuantizedLayer
from workbench.engine.quantizers.modules import QUANTIZE, ActivationQuantizer

INT32_MIN = -(2**31)
# float32 rounds 2**31 - 1 up to 2**31: the largest float32 code below it
INT32_MAX_FLOAT32 = 2**31 - 128


def bias_scale_for(layer: QuantizedLayer, input_quantizer: ActivationQuantizer) -> torch.Tensor:
    """``s_input * s_weight`` (one per output channel when the weight is per-channel)."""
    input_scale = input_quantizer.scale.detach().abs().reshape(())
    weight_scale, _ = layer.weight_quantizer.qparams(layer.layer.weight)
    weight_scale = weight_scale.detach().abs().reshape(-1)
    scale = (input_scale * weight_scale).to(torch.float32)
    out_channels = layer.layer.weight.shape[0]
    return scale.expand(out_channels).contiguous() if scale.numel() == 1 else scale


def bias_on_grid(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``bias`` rounded to the INT32 grid ``scale``, as the export stores it (straight-through
    gradient, so QAT still trains the FP32 bias)."""
    rounded = torch.round(bias / scale).clamp(INT32_MIN, INT32_MAX_FLOAT32) * scale
    return bias + (rounded - bias).detach()


class QuantizedLayerCalls(CountsCalls, QuantizedLayer):
    """One quantized layer, one input quantizer per call site (module docstring)."""

    def __init__(
        self,
        layer: QuantizedLayer,
        call_count: int,
        new_input_quantizer: Callable[[int], ActivationQuantizer],
    ) -> None:
        super().__init__(
            layer.layer,
            layer.layer_name,
            layer.weight_quantizer,
            layer.input_quantizer,
            layer.output_quantizer,
        )
        self.call_input_quantizers = nn.ModuleList(
            new_input_quantizer(index) for index in range(1, call_count)
        )
        self.calls = 0
        self.call_count = call_count

    def input_quantizer_of_call(self, index: int) -> ActivationQuantizer | None:
        return self.input_quantizer if index == 0 else self.call_input_quantizers[index - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.next_call()
        quantizer = self.input_quantizer_of_call(index)
        if quantizer is not None:
            x = quantizer(x)
        weight = self.weight_quantizer(self.layer.weight)
        bias = self.layer.bias
        if (
            index > 0
            and bias is not None
            and quantizer is not None
            and quantizer.mode == QUANTIZE
            and quantizer.calibrated
            and self.weight_quantizer.scheme.group_size is None  # MatMulNBits: FP32 bias
        ):
            bias = bias_on_grid(bias, bias_scale_for(self, quantizer))
        if isinstance(self.layer, nn.Linear):
            out = F.linear(x, weight, bias)
        else:
            out = self.layer._conv_forward(x, weight, bias)
        if self.output_quantizer is not None:
            out = self.output_quantizer(out)
        return out

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}, {self.call_count} call sites"
