"""The quantization scheme: bit width, symmetry, granularity.

Semantics follow PyTorch and ONNX Runtime:

* symmetric  -> zero point 0, signed range [-2^(b-1), 2^(b-1)-1]
  (narrow_range drops -2^(b-1) so that the grid is symmetric around 0);
* asymmetric -> unsigned range [0, 2^b-1] (narrow_range drops 2^b-1).

Block-wise (``group_size``): one scale (and zero point) per output channel and per group of
``group_size`` consecutive inputs of a 2-D ``[out, in]`` Linear weight; the last group of a row
may be partial. The layout of ONNX ``DequantizeLinear``'s ``block_size`` and of ONNX Runtime's
``MatMulNBits``.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8  # integer widths a Scheme accepts (ONNX Runtime's kernels: up to 8)
GROUP_SIZES = (16, 32, 64, 128, 256)  # block sizes MatMulNBits runs (powers of two, >= 16)


@dataclass(frozen=True)
class Scheme:
    """How one tensor is quantized.

    Parameters
    ----------
    bits : int
        Integer width, 2..8.
    symmetric : bool
        Symmetric (signed, zero point 0) or asymmetric (unsigned, zero point fitted).
    per_channel : bool
        One scale per slice along ``axis`` instead of one per tensor.
    axis : int
        Channel axis for per-channel schemes (0 = output channels of Linear / Conv weights).
    narrow_range : bool
        Drop the most negative (symmetric) or most positive (asymmetric) code.
    group_size : int or None
        Block-wise scales: one per output channel and per ``group_size`` inputs (16, 32, 64,
        128 or 256) of a 2-D Linear weight; needs ``per_channel=True, axis=0``. ``None`` = one
        scale per channel (or per tensor).
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    axis: int = 0
    narrow_range: bool = False
    group_size: int | None = None

    def __post_init__(self) -> None:
        limits = f"{MIN_BITS}..{MAX_BITS}"
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"Scheme bits must be an int in {limits}, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"Scheme bits must be in {limits}, got {self.bits}; use bits=8 for INT8"
            )
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise ConfigError(f"Scheme axis must be an int, got {self.axis!r}")
        for flag in ("symmetric", "per_channel", "narrow_range"):
            value = getattr(self, flag)
            if not isinstance(value, bool):  # "False" and "no" are truthy strings
                raise ConfigError(
                    f"Scheme {flag} must be True or False, got {type(value).__name__} {value!r}; "
                    f"pass e.g. {flag}=False"
                )
        if self.group_size is not None:
            self._check_group_size()

    def _check_group_size(self) -> None:
        sizes = ", ".join(map(str, GROUP_SIZES))
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size not in GROUP_SIZES:
            raise ConfigError(
                f"Scheme group_size must be a power of two in 16..256 ({sizes}) or None, got "
                f"{size!r}; e.g. group_size=32 or group_size=128"
            )
        if not self.per_channel or self.axis != 0:
            raise ConfigError(
                f"a block-wise scheme (group_size={size}) has one scale per output channel and "
                "per group of inputs; pass per_channel=True, axis=0 with it"
            )

    @property
    def quant_min(self) -> int:
        """Smallest integer code."""
        if self.symmetric:
            low = -(2 ** (self.bits - 1))
            return low + 1 if self.narrow_range else low
        return 0

    @property
    def quant_max(self) -> int:
        """Largest integer code."""
        if self.symmetric:
            return 2 ** (self.bits - 1) - 1
        high = 2**self.bits - 1
        return high - 1 if self.narrow_range else high

    @property
    def levels(self) -> int:
        """Number of integer codes."""
        return self.quant_max - self.quant_min + 1

    @property
    def signed(self) -> bool:
        """Whether the integer codes are signed (int8) or unsigned (uint8)."""
        return self.quant_min < 0

    def describe(self) -> str:
        """Short human-readable form, e.g. ``int8 sym per-channel``."""
        kind = "int" if self.signed else "uint"
        sym = "sym" if self.symmetric else "asym"
        gran = "per-channel" if self.per_channel else "per-tensor"
        if self.group_size is not None:
            gran = f"g{self.group_size}"
        return f"{kind}{self.bits} {sym} {gran}"
