"""The PTQ refinements that run after calibration, in order: learned or second-order weight
rounding (``weight_method="adaround"`` or ``"gptq"``), then bias correction (which then also
removes the mean error the rounding leaves). Each marks the layers it changed in their plans."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from workbench.engine.algorithms.adaround import adaround_model
from workbench.engine.algorithms.bias_correction import correct_biases, correct_biases_analytically
from workbench.engine.algorithms.gptq import gptq_model
from workbench.engine.capture.prepare import QUANTIZED, LayerPlan
from workbench.engine.config import QuantConfig
from workbench.errors import ConfigError


def check_training_config(config: QuantConfig, caller: str) -> None:
    """QAT trains the weights and biases itself: learned rounding and bias correction are
    PTQ refinements (cross-layer equalization, done before calibration, applies to both).
    Dynamic activations have no scale to train: they need no QAT."""
    if config.dynamic:
        raise ConfigError(
            f"{caller} trains static activation scales, and activation_mode='dynamic' computes "
            "them from each input: quantize with wb.ptq(model, config=config) (no training "
            "needed), or use activation_mode='static' for QAT"
        )
    given = []
    if config.weight_method != "nearest":
        given.append(f"weight_method={config.weight_method!r}")
    if config.bias_correction_method is not None:
        given.append("bias_correction")
    if given:
        raise ConfigError(
            f"{caller} trains the weights and biases: {' and '.join(given)} apply to wb.ptq; "
            "drop them from the config (equalize=True works with QAT)"
        )


def refine_quantized_model(
    fp32_model: nn.Module,
    quantized_model: nn.Module,
    plans: list[LayerPlan],
    config: QuantConfig,
    batches: Sequence[Any],
    progress: bool = True,
) -> None:
    """Apply the config's post-calibration refinements to ``quantized_model`` in place."""
    by_name = {plan.name: plan for plan in plans}
    for plan in plans:
        if plan.status == QUANTIZED:
            plan.weight_rounding = "nearest"
    if config.weight_method == "adaround":
        rounded = adaround_model(
            fp32_model, quantized_model, batches, config.adaround_iterations, progress
        )
        for name in rounded:
            if name in by_name:
                by_name[name].weight_rounding = "adaround"
    if config.weight_method == "gptq":
        for name in gptq_model(quantized_model, batches, config.gptq_act_order, progress):
            if name in by_name:
                by_name[name].weight_rounding = "gptq"
    corrected: list[str] = []
    if config.bias_correction_method == "empirical":
        corrected = correct_biases(fp32_model, quantized_model, batches)
    elif config.bias_correction_method == "analytic":
        corrected = correct_biases_analytically(fp32_model, quantized_model, plans, batches[0])
    for name in corrected:
        if name in by_name:
            by_name[name].bias_corrected = True
