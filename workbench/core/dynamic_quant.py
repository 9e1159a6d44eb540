"""Dynamic activation quantization: scale and zero point computed from each input at run time,
exactly as ONNX Runtime's ``DynamicQuantizeLinear`` computes them.

    x_min = min(0, min(x)),  x_max = max(0, max(x))             (the range includes 0)
    s = (x_max - x_min) / 255                                    (float32; 1.0 when x_min == x_max)
    z = saturate(round(0 - x_min / s))                           (uint8, round half to even)
    q = saturate(round(x / s) + z)                               (true division, half to even)

ONNX Runtime takes ``s = 1`` for a tensor with a single value (all zeros); the ONNX reference
implementation divides by 255 there. Both dequantize to the same values.
"""

from __future__ import annotations

import torch

from workbench.core.qparams import check_finite
from workbench.core.scheme import Scheme

DYNAMIC_QUANT_MIN, DYNAMIC_QUANT_MAX = 0, 255
DYNAMIC_SCHEME = Scheme(bits=8, symmetric=False, per_channel=False)  # uint8, per tensor


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale float32 0-d, zero_point int32 0-d)`` of ``x`` as DynamicQuantizeLinear."""
    x = x.detach().to(torch.float32)
    if x.numel() == 0:
        return torch.ones((), dtype=torch.float32), torch.zeros((), dtype=torch.int32)
    zero = torch.zeros((), dtype=torch.float32)
    low = torch.minimum(x.min(), zero)
    high = torch.maximum(x.max(), zero)
    levels = torch.tensor(float(DYNAMIC_QUANT_MAX - DYNAMIC_QUANT_MIN), dtype=torch.float32)
    scale = torch.where(high == low, torch.ones((), dtype=torch.float32), (high - low) / levels)
    zero_point = torch.round(
        torch.clamp(DYNAMIC_QUANT_MIN - low / scale, DYNAMIC_QUANT_MIN, DYNAMIC_QUANT_MAX)
    )
    return scale, zero_point.to(torch.int32)


def dynamic_quantize(
    x: torch.Tensor, name: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(uint8 codes, scale, zero_point)`` of ``x``: the three outputs of
    DynamicQuantizeLinear (zero point as int32). NaN / Inf raise a ``NonFiniteError``."""
    check_finite(x.detach(), name)
    scale, zero_point = dynamic_qparams(x)
    codes = _codes(x.detach().to(torch.float32), scale, zero_point)
    return codes.to(torch.uint8), scale, zero_point


def _codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale) + zero_point, DYNAMIC_QUANT_MIN, DYNAMIC_QUANT_MAX)


class _DynamicFakeQuant(torch.autograd.Function):
    """Quantize-dequantize with per-call qparams; straight-through gradient inside the range
    (the range holds every value, so the gradient passes unchanged)."""

    @staticmethod
    def forward(ctx, x):
        scale, zero_point = dynamic_qparams(x)
        values = x.to(torch.float32)
        out = (_codes(values, scale, zero_point) - zero_point) * scale
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out


def fake_quantize_dynamic(x: torch.Tensor) -> torch.Tensor:
    """``x`` quantized to uint8 with its own scale and zero point (as DynamicQuantizeLinear)
    and dequantized: ``(q - z) * s``."""
    return _DynamicFakeQuant.apply(x)
