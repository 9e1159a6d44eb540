"""Dynamic activation quantization in the simulated model (``activation_mode="dynamic"``).

A :class:`DynamicActivationQuantizer` takes the place of a Linear layer's calibrated input
quantizer: it computes the scale and zero point of every input it sees, as ONNX Runtime's
``DynamicQuantizeLinear`` does (``core.dynamic_quant``), so it needs no calibration. Nothing
else is quantized statically: there are no output quantizers (a conv's ``DQ -> Conv -> Q`` or a
residual add's ``QLinearAdd`` need calibrated scales), and convolutions keep FP32 inputs
(weight-only; see ``CONV_NOTE``).
"""

from __future__ import annotations

import torch

from workbench.core.dynamic_quant import DYNAMIC_SCHEME, fake_quantize_dynamic
from workbench.engine.quantizers.modules import QUANTIZE, ActivationQuantizer

# measured on this project's benchmark CPU (AMD EPYC, AVX2, 1 thread): two 3x3 convs at 56x56,
# FP32 52 ms, ONNX Runtime quantize_dynamic's DynamicQuantizeLinear -> ConvInteger 153 ms
CONV_NOTE = (
    "dynamic mode quantizes Linear inputs only: the conv keeps an FP32 input (int8 weights); "
    "ONNX Runtime's dynamic conv (DynamicQuantizeLinear -> ConvInteger) runs slower than FP32"
)


class DynamicActivationQuantizer(ActivationQuantizer):
    """The input quantizer of a Linear layer in dynamic mode: uint8, per tensor, scale and zero
    point from each input (``mode`` ``quantize``), pass-through when ``off`` or ``observe``;
    its ``scale`` / ``zero_point`` buffers are unused."""

    dynamic = True

    def __init__(self, tensor_name: str) -> None:
        super().__init__(DYNAMIC_SCHEME, "minmax", tensor_name)
        self.observer = None  # nothing to calibrate
        self.observer_name = "dynamic"

    def calibrate(self) -> None:
        """Nothing to calibrate: the qparams come from each input."""

    def share_qparams_of(self, source: ActivationQuantizer) -> None:
        """A dynamic quantizer never takes another one's grid."""

    def enable_learned_scale(self) -> None:
        raise NotImplementedError("a dynamic activation quantizer has no scale to learn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != QUANTIZE:
            return x
        return fake_quantize_dynamic(x)

    def extra_repr(self) -> str:
        return f"{self.scheme.describe()}, dynamic, mode={self.mode}"
