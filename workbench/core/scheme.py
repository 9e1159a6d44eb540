"""The quantization scheme: bit width, symmetry, granularity.

Semantics follow PyTorch and ONNX Runtime:

* symmetric  -> zero point 0, signed range [-2^(b-1), 2^(b-1)-1]
  (narrow_range drops -2^(b-1) so that the grid is symmetric around 0);
* asymmetric -> unsigned range [0, 2^b-1] (narrow_range drops 2^b-1).
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8  # integer widths a Scheme accepts (ONNX Runtime's kernels: up to 8)


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
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    axis: int = 0
    narrow_range: bool = False

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
        return f"{kind}{self.bits} {sym} {gran}"
