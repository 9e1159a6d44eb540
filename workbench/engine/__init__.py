"""Model transforms: capture, fold BN, place quantizers, calibrate (PTQ), train (QAT)."""

from workbench.engine.config import PRESETS, QuantConfig

__all__ = ["PRESETS", "QuantConfig"]
