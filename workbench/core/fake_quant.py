"""Fake quantization (quantize then dequantize in float) with the straight-through estimator.

Forward:  x' = s * (clamp(round(x / s) + z, q_min, q_max) - z)
Backward (STE): dx'/dx = 1 where round(x / s) + z lies inside [q_min, q_max], else 0.

The fixed-scale path uses PyTorch's own fake-quant kernels (fast, and the reference the
rest of the core is tested against). The learnable-scale path implements LSQ
(Esser et al., 2020): the scale receives the gradient
    dx'/ds = round(x/s) - x/s   inside the range,   q_min - z / q_max - z   outside,
multiplied by g = 1 / sqrt(numel * q_max) to keep its step size comparable to the weights'.

Block-wise schemes (scale ``[out, G]``) run the same per-channel kernels on the grouped view
``[out * G, g]`` of the weight (``core.blockwise``).
"""

from __future__ import annotations

import math

import torch

from workbench.core.blockwise import grouped_rows, ungrouped
from workbench.core.qtensor import along_axis
from workbench.core.scheme import Scheme


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: Scheme
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with fixed qparams; differentiable in ``x`` through the STE."""
    if scheme.group_size is not None and scale.dim() == 2:
        rows = torch.fake_quantize_per_channel_affine(
            grouped_rows(x, scheme.group_size),
            scale.reshape(-1).to(torch.float32),
            zero_point.reshape(-1).to(torch.int32),
            0,
            scheme.quant_min,
            scheme.quant_max,
        )
        return ungrouped(rows, x.shape)
    if scale.dim() == 0 or not scheme.per_channel:
        return torch.fake_quantize_per_tensor_affine(
            x,
            scale.reshape(()).to(torch.float32),
            zero_point.reshape(()).to(torch.int32),
            scheme.quant_min,
            scheme.quant_max,
        )
    return torch.fake_quantize_per_channel_affine(
        x,
        scale.to(torch.float32),
        zero_point.to(torch.int32),
        scheme.axis % x.dim(),
        scheme.quant_min,
        scheme.quant_max,
    )


class _LearnedScaleFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
        s = along_axis(scale, x, axis)
        z = along_axis(zero_point.to(x.dtype), x, axis)
        x_over_s = x / s
        unclamped = torch.round(x_over_s) + z
        q = torch.clamp(unclamped, quant_min, quant_max)
        ctx.save_for_backward(x_over_s, unclamped, z)
        ctx.meta = (quant_min, quant_max, axis, grad_factor, scale.dim())
        return (q - z) * s

    @staticmethod
    def backward(ctx, grad_out):
        x_over_s, unclamped, z = ctx.saved_tensors
        quant_min, quant_max, axis, grad_factor, scale_dims = ctx.meta
        below = unclamped < quant_min
        above = unclamped > quant_max
        inside = ~(below | above)
        grad_x = grad_out * inside.to(grad_out.dtype)
        local = torch.round(x_over_s) - x_over_s
        local = torch.where(below, quant_min - z, local)
        local = torch.where(above, quant_max - z, local)
        grad_s_full = grad_out * local * grad_factor
        if scale_dims == 0:
            grad_s = grad_s_full.sum()
        else:
            dims = [d for d in range(grad_out.dim()) if d != axis]
            grad_s = grad_s_full.sum(dim=dims)
        return grad_x, grad_s, None, None, None, None, None


def fake_quantize_learned_scale(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    scheme: Scheme,
    grad_factor: float | None = None,
) -> torch.Tensor:
    """LSQ fake quantization: like :func:`fake_quantize`, and ``scale`` gets a gradient.

    ``grad_factor`` defaults to LSQ's ``1 / sqrt(numel_per_scale * q_max)``.
    """
    axis = scheme.axis % x.dim() if (scheme.per_channel and scale.dim() > 0) else 0
    if grad_factor is None:
        per_scale = x.numel() / max(scale.numel(), 1)
        grad_factor = 1.0 / math.sqrt(per_scale * max(scheme.quant_max, 1))
    if scheme.group_size is not None and scale.dim() == 2:
        rows = _LearnedScaleFakeQuant.apply(
            grouped_rows(x, scheme.group_size),
            scale.reshape(-1),
            zero_point.reshape(-1),
            scheme.quant_min,
            scheme.quant_max,
            0,
            grad_factor,
        )
        return ungrouped(rows, x.shape)
    return _LearnedScaleFakeQuant.apply(
        x, scale, zero_point, scheme.quant_min, scheme.quant_max, axis, grad_factor
    )
