"""Quantize / dequantize a tensor, and the QTensor that holds the result.

q = clamp(round(x / s) + z, q_min, q_max)      x' = s * (q - z)

Rounding is half-to-even and ``x / s`` is computed as ``x * (1 / s)`` in float32, exactly as
PyTorch's fake-quant kernels do, so that ``dequantize(quantize(x))`` equals
``torch.fake_quantize_per_*_affine`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.core.blockwise import (
    check_blockwise_tensor,
    expand_groups,
    group_count,
    grouped_rows,
)
from workbench.core.qparams import check_finite, qparams_from_range
from workbench.core.scheme import Scheme
from workbench.errors import ConfigError


def along_axis(param: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """``param`` (0-d or one value per channel) shaped to broadcast with ``x`` along ``axis``."""
    if param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def broadcast_qparam(param: torch.Tensor, x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """A scale / zero point (0-d, one per channel, or ``[out, G]`` per group) shaped to
    broadcast elementwise with ``x``."""
    if scheme.group_size is not None and param.dim() == 2:
        return expand_groups(param, x.shape[1], scheme.group_size)
    axis = scheme.axis % x.dim() if x.dim() else 0
    return along_axis(param, x, axis)


def quantize_with(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: Scheme
) -> torch.Tensor:
    """Integer codes (int32) of ``x`` for given qparams."""
    inv_scale = 1.0 / scale.to(torch.float32)
    rounded = torch.round(x.to(torch.float32) * broadcast_qparam(inv_scale, x, scheme))
    q = rounded + broadcast_qparam(zero_point.to(torch.float32), x, scheme)
    return torch.clamp(q, scheme.quant_min, scheme.quant_max).to(torch.int32)


def dequantize_with(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: Scheme
) -> torch.Tensor:
    """Float32 values ``s * (q - z)``."""
    centered = q.to(torch.float32) - broadcast_qparam(zero_point.to(torch.float32), q, scheme)
    return centered * broadcast_qparam(scale.to(torch.float32), q, scheme)


def tensor_range(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Min / max of ``x``: per tensor, per channel along ``scheme.axis``, or per group
    (``[out, G]``, block-wise schemes)."""
    if scheme.group_size is not None:
        check_blockwise_tensor(x, scheme)
        rows = grouped_rows(x, scheme.group_size)
        shape = (x.shape[0], group_count(x.shape[1], scheme.group_size))
        # amin / amax: the same values as min / max without their indices, 2x faster
        return rows.amin(dim=1).reshape(shape), rows.amax(dim=1).reshape(shape)
    if not scheme.per_channel:
        return x.min(), x.max()
    if x.dim() == 0:
        raise ConfigError("a per-channel scheme needs a tensor with at least one dimension")
    if not -x.dim() <= scheme.axis < x.dim():
        raise ConfigError(
            f"per-channel axis {scheme.axis} is out of range for a {x.dim()}-D tensor; "
            f"use an axis in [{-x.dim()}, {x.dim() - 1}]"
        )
    axis = scheme.axis % x.dim()
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
    return flat.amin(dim=1), flat.amax(dim=1)


def zero_point_bytes(count: int, scheme: Scheme) -> int:
    """Bytes of ``count`` zero points: none when symmetric; 1 byte each, or packed at
    ``bits`` each for block-wise schemes (whose many zero points are stored packed)."""
    if scheme.symmetric:
        return 0
    if scheme.group_size is not None:
        return -(-count * scheme.bits // 8)
    return count


@dataclass
class QTensor:
    """A quantized tensor: integer codes plus the parameters to map them back.

    Attributes
    ----------
    q : torch.Tensor
        Integer codes (int8 when signed, uint8 when unsigned; int32 never needed for b <= 8).
    scale : torch.Tensor
        float32, shape ``[]`` (per tensor), ``[C]`` (per channel) or ``[C, G]`` (block-wise:
        per output channel and per group of ``scheme.group_size`` inputs).
    zero_point : torch.Tensor
        int32, same shape as ``scale``.
    scheme : Scheme
        The scheme that produced it.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    scheme: Scheme

    def dequantize(self) -> torch.Tensor:
        """Float32 approximation ``scale * (q - zero_point)``."""
        return dequantize_with(self.q, self.scale, self.zero_point, self.scheme)

    @property
    def storage_bytes(self) -> int:
        """Bytes to store codes (packed for b < 8), scales (4 B each) and zero points (1 B each;
        block-wise: packed like the codes, as ONNX Runtime's MatMulNBits stores them)."""
        code_bytes = -(-self.q.numel() * self.scheme.bits // 8)
        zp_bytes = zero_point_bytes(self.zero_point.numel(), self.scheme)
        return code_bytes + 4 * self.scale.numel() + zp_bytes


def quantize_tensor(x: torch.Tensor, scheme: Scheme, name: str = "tensor") -> QTensor:
    """Quantize ``x`` with a scheme, taking the range from ``x`` itself (min/max).

    The range always includes 0, so 0.0 is represented exactly.
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float32)
    if x.numel() == 0:
        raise ConfigError(f"{name} is empty; pass a tensor with at least one value")
    x = x.detach().to(torch.float32)
    check_finite(x, name)
    min_val, max_val = tensor_range(x, scheme)
    scale, zero_point = qparams_from_range(min_val, max_val, scheme, name)
    q = quantize_with(x, scale, zero_point, scheme)
    q = q.to(torch.int8 if scheme.signed else torch.uint8)
    return QTensor(q=q, scale=scale, zero_point=zero_point, scheme=scheme)
