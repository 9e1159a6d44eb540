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

CHUNK_BYTES = 1 << 23  # codes handled per block: small temporaries for the largest layers


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
        if self.scheme.bits > 8:
            return self.stored.reshape(self.shape)
        return self._unsigned().to(torch.int32).add_(self.scheme.quant_min).reshape(self.shape)

    def _unsigned(self) -> torch.Tensor:
        """``q - q_min`` as uint8, flat (one byte per code)."""
        stored = self.stored
        if self.scheme.bits <= 4:
            stored = torch.stack((stored & 0x0F, stored >> 4), dim=-1).reshape(-1)
        return stored[: self.shape.numel()]

    def _unsigned_float(self) -> torch.Tensor:
        """``q - q_min`` as float32, flat, unpacked a chunk at a time into one buffer."""
        count = self.shape.numel()
        if self.scheme.bits > 4:
            return self.stored[:count].to(torch.float32)
        out = torch.empty(2 * self.stored.numel(), dtype=torch.float32)
        pairs = out.view(-1, 2)
        for start in range(0, self.stored.numel(), CHUNK_BYTES):
            chunk = self.stored[start : start + CHUNK_BYTES]
            pairs[start : start + len(chunk), 0] = chunk & 0x0F
            pairs[start : start + len(chunk), 1] = chunk >> 4
        return out[:count]

    def dequantize(self) -> torch.Tensor:
        """``s * (q - z)`` in float32, the weight's shape. Computed in place on one float32
        buffer: the weight's size in float32 plus its codes at most, even for the largest
        layer (an LM head)."""
        scale = self.scale.to(torch.float32)
        zero = self.zero_point.to(torch.float32)
        if self.scheme.bits > 8:
            q = self.stored.to(torch.float32).reshape(self.shape)
        else:
            q = self._unsigned_float().reshape(self.shape)
            zero = zero - self.scheme.quant_min  # q - z = (q - q_min) - (z - q_min)
        if _grouped(self.scheme, scale):
            rows = grouped_rows(q, self.scheme.group_size)
            rows.sub_(zero.reshape(-1, 1)).mul_(scale.reshape(-1, 1))
            return ungrouped(rows, self.shape)
        if scale.dim() == 0 or not self.scheme.per_channel:
            return q.sub_(zero.reshape(())).mul_(scale.reshape(()))
        axis = self.scheme.axis % q.dim()
        return q.sub_(along_axis(zero, q, axis)).mul_(along_axis(scale, q, axis))


def rows_of(codes: WeightCodes, index: torch.Tensor) -> WeightCodes | None:
    """The codes of rows ``index`` of a 2-D weight (a sample to measure), or None where the
    rows do not start on a byte (odd row length with two codes per byte)."""
    if len(codes.shape) != 2:
        return None
    rows, columns = codes.shape
    scheme = codes.scheme
    if scheme.bits <= 4 and columns % 2:
        return None
    width = columns // 2 if scheme.bits <= 4 else columns
    stored = codes.stored[: rows * width].reshape(rows, width)[index].reshape(-1)
    scale, zero = codes.scale, codes.zero_point
    per_row = scale.dim() == 1 and scheme.per_channel and scheme.axis % 2 == 0
    if _grouped(scheme, scale) or per_row:
        scale, zero = scale[index], zero[index]
    return WeightCodes(stored, scale, zero, scheme, torch.Size((len(index), columns)))


def row_block(codes: WeightCodes, start: int, end: int) -> WeightCodes | None:
    """Rows ``start:end`` of a 2-D weight's codes, as views (no copy); None where a row does
    not start on a byte (odd rows of an odd length, two codes per byte)."""
    if len(codes.shape) != 2:
        return None
    rows, columns = codes.shape
    scheme = codes.scheme
    per_byte = 2 if scheme.bits <= 4 else 1
    if (start * columns) % per_byte or (end < rows and (end * columns) % per_byte):
        return None
    first, last = start * columns // per_byte, -(-end * columns // per_byte)
    stored = codes.stored[first:last]
    scale, zero = codes.scale, codes.zero_point
    per_row = scale.dim() == 1 and scheme.per_channel and scheme.axis % 2 == 0
    if _grouped(scheme, scale) or per_row:
        scale, zero = scale[start:end], zero[start:end]
    return WeightCodes(stored, scale, zero, scheme, torch.Size((end - start, columns)))


def _grouped(scheme: Scheme, scale: torch.Tensor) -> bool:
    return scheme.group_size is not None and scale.dim() == 2


def weight_codes(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    scheme: Scheme,
    copy_qparams: bool = True,
) -> WeightCodes:
    """The codes of ``weight`` for fixed qparams, stored compactly (``WeightCodes``);
    computed a block of rows at a time, so a large layer needs little more than its codes.
    ``copy_qparams`` False: the codes hold ``scale`` and ``zero_point`` themselves, not copies
    (a group-wise scheme's qparams are an eighth of the weight's FP32 bytes or more)."""
    w = weight.detach().to(torch.float32)
    if copy_qparams:
        scale, zero_point = scale.detach().clone(), zero_point.detach().clone()
    rows = w.shape[0] if w.dim() else 1
    per_row = max(1, w.numel() // max(rows, 1))
    step = max(2, (CHUNK_BYTES // per_row) // 2 * 2)  # an even number of rows per block
    if w.dim() < 2 or rows <= step or scheme.bits > 8:
        return WeightCodes(
            pack_codes(_codes_float(w, scale, zero_point, scheme), scheme),
            scale.detach(),
            zero_point.detach(),
            scheme,
            w.shape,
        )
    per_byte = 2 if scheme.bits <= 4 else 1
    stored = torch.empty(-(-w.numel() // per_byte), dtype=torch.uint8)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        s, z = _rows_of_qparams(scale, zero_point, scheme, w, start, end)
        packed = pack_codes(_codes_float(w[start:end], s, z, scheme), scheme)
        offset = start * per_row // per_byte
        stored[offset : offset + packed.numel()] = packed
    return WeightCodes(stored, scale.detach(), zero_point.detach(), scheme, w.shape)


def _rows_of_qparams(scale, zero_point, scheme, w, start, end):
    """The qparams that apply to rows ``start:end`` of ``w``."""
    per_row = scale.dim() == 1 and scheme.per_channel and scheme.axis % w.dim() == 0
    if _grouped(scheme, scale) or per_row:
        return scale[start:end], zero_point[start:end]
    return scale, zero_point


def _codes_float(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: Scheme
) -> torch.Tensor:
    """``clamp(round(w * (1 / s)) + z)`` as float32, in place on one buffer."""
    inverse = 1.0 / scale.detach().to(torch.float32)
    zero = zero_point.detach().to(torch.float32)
    if _grouped(scheme, inverse):
        rows = grouped_rows(w, scheme.group_size) * inverse.reshape(-1, 1)
        q = ungrouped(rows.round_().add_(zero.reshape(-1, 1)), w.shape)
    elif inverse.dim() == 0 or not scheme.per_channel:
        q = (w * inverse.reshape(())).round_().add_(zero.reshape(()))
    else:
        axis = scheme.axis % w.dim()
        q = (w * along_axis(inverse, w, axis)).round_().add_(along_axis(zero, w, axis))
    return q.clamp_(scheme.quant_min, scheme.quant_max)


def pack_codes(q: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Codes ``q`` (any integer-valued tensor) as ``WeightCodes.stored``."""
    if scheme.bits > 8:
        return q.to(torch.int32).reshape(-1)
    # q - q_min in 0..255, through int16 (half the bytes of a float32 temporary; a new
    # tensor, never ``q`` itself changed in place when it is int16 already)
    unsigned = torch.sub(q.reshape(-1).to(torch.int16), scheme.quant_min).to(torch.uint8)
    if scheme.bits > 4:
        return unsigned
    if unsigned.numel() % 2:
        unsigned = torch.cat((unsigned, unsigned.new_zeros(1)))
    pairs = unsigned.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)
