"""Scale and zero point from a clipping range (the tutorial's formulas).

symmetric:  s = max(|min|, |max|) / (2^(b-1) - 1),              z = 0
asymmetric: range widened to include 0 so that 0.0 is exact,
            s = (max - min) / (2^b - 1),  z = q_min - round(min / s)
"""

from __future__ import annotations

import torch

from workbench.core.scheme import Scheme
from workbench.errors import NonFiniteError

SCALE_EPS = float(torch.finfo(torch.float32).eps)


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise one clear error if ``tensor`` holds NaN or Inf."""
    if tensor.is_floating_point() and bool(torch.isfinite(tensor.sum())):
        return  # NaN / Inf would make the sum NaN / Inf: one pass, no mask of the tensor
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(
            f"{name} holds {bad} NaN/Inf value(s); fix the model or data that produced them "
            "before quantizing (a quantization range cannot be computed from NaN/Inf)"
        )


def qparams_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, scheme: Scheme, name: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(scale float32, zero_point int32)`` for a clipping range.

    ``min_val`` / ``max_val`` are 0-d for per-tensor schemes and 1-d (one entry per channel)
    for per-channel schemes. The returned tensors have the same shape.
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    check_finite(min_val, f"the range minimum of {name}")
    check_finite(max_val, f"the range maximum of {name}")
    min_neg = torch.minimum(min_val, torch.zeros_like(min_val))
    max_pos = torch.maximum(max_val, torch.zeros_like(max_val))
    if scheme.symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = amax / float(scheme.quant_max)
        scale = torch.clamp(scale, min=SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (max_pos - min_neg) / float(scheme.quant_max - scheme.quant_min)
        scale = torch.clamp(scale, min=SCALE_EPS)
        zero_point = scheme.quant_min - torch.round(min_neg / scale)
        zero_point = torch.clamp(zero_point, scheme.quant_min, scheme.quant_max).to(torch.int32)
    return scale.to(torch.float32), zero_point
