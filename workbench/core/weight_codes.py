"""A weight's integer codes with their qparams, kept compactly and dequantized on demand.

    q = clamp(round(W * (1 / s)) + z, q_min, q_max)      W' = s * (q - z)

The codes of a weight quantized with fixed qparams are computed once and kept, instead of
fake-quantizing the FP32 weight again at every forward pass: codes of up to 8 bits take one
byte each, codes of up to 4 bits two per byte (the first in the low nibble). Dequantizing them
gives exactly what ``torch.fake_quantize_per_*_affine`` gives for the same weight (the same
float32 product ``(q - z) * s``), at a quarter or an eighth of the FP32 weight's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.core.blockwise import grouped_rows, ungrouped
from workbench.core.qtensor import along_axis
from workbench.core.scheme import Scheme


@dataclass(eq=False)
class WeightCodes:
    """Integer codes of one weight tensor (layout of the weight) and their qparams.

    ``stored`` holds ``q - q_min`` as uint8, two codes per byte when ``scheme.bits <= 4``
    (flattened, zero-padded to an even count), one per byte up to 8 bits, and the int32 codes
    themselves above 8 bits. ``scale`` / ``zero_point`` are 0-d, one per channel along
    ``scheme.axis``, or ``[out, groups]`` for block-wise schemes.
    """

    stored: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    scheme: Scheme
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.stored.numel() * self.stored.element_size()

    def codes(self) -> torch.Tensor:
        """The codes ``q`` (int32) in the weight's layout."""
        stored = self.stored
        if self.scheme.bits > 8:
            return stored.reshape(self.shape)
        if self.scheme.bits <= 4:
            stored = torch.stack((stored & 0x0F, stored >> 4), dim=-1).reshape(-1)
        count = self.shape.numel()
        return (stored[:count].to(torch.int32) + self.scheme.quant_min).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        """``s * (q - z)`` in float32, the weight's shape."""
        q = self.codes().to(torch.float32)
        scale = self.scale.to(torch.float32)
        zero = self.zero_point.to(torch.float32)
        if _grouped(self.scheme, scale):
            rows = grouped_rows(q, self.scheme.group_size)
            values = (rows - zero.reshape(-1, 1)) * scale.reshape(-1, 1)
            return ungrouped(values, self.shape)
        if scale.dim() == 0 or not self.scheme.per_channel:
            return (q - zero.reshape(())) * scale.reshape(())
        axis = self.scheme.axis % q.dim()
        return (q - along_axis(zero, q, axis)) * along_axis(scale, q, axis)


def _grouped(scheme: Scheme, scale: torch.Tensor) -> bool:
    return scheme.group_size is not None and scale.dim() == 2


def weight_codes(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: Scheme
) -> WeightCodes:
    """The codes of ``weight`` for fixed qparams, stored compactly (``WeightCodes``)."""
    w = weight.detach().to(torch.float32)
    inverse = 1.0 / scale.detach().to(torch.float32)
    zero = zero_point.detach().to(torch.float32)
    if _grouped(scheme, inverse):
        rows = grouped_rows(w, scheme.group_size)
        q = torch.round(rows * inverse.reshape(-1, 1)) + zero.reshape(-1, 1)
        q = ungrouped(q, w.shape)
    elif inverse.dim() == 0 or not scheme.per_channel:
        q = torch.round(w * inverse.reshape(())) + zero.reshape(())
    else:
        axis = scheme.axis % w.dim()
        q = torch.round(w * along_axis(inverse, w, axis)) + along_axis(zero, w, axis)
    q = torch.clamp(q, scheme.quant_min, scheme.quant_max)
    return WeightCodes(
        pack_codes(q, scheme),
        scale.detach().clone(),
        zero_point.detach().clone(),
        scheme,
        w.shape,
    )


def pack_codes(q: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Codes ``q`` (any integer-valued tensor) as ``WeightCodes.stored``."""
    if scheme.bits > 8:
        return q.to(torch.int32).reshape(-1)
    unsigned = (q.reshape(-1) - scheme.quant_min).to(torch.uint8)
    if scheme.bits > 4:
        return unsigned
    if unsigned.numel() % 2:
        unsigned = torch.cat((unsigned, unsigned.new_zeros(1)))
    pairs = unsigned.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)
