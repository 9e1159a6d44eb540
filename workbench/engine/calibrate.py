"""PTQ steps on a model: deep copy, fold BN, insert quantizers, calibrate."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.core.qparams import check_finite
from workbench.engine.batches import run_model
from workbench.engine.bn_fold import fold_batchnorms
from workbench.engine.config import QuantConfig
from workbench.engine.graph_quantizers import finish_output_quantizers, insert_output_quantizers
from workbench.engine.layers import iter_quantized_layers
from workbench.engine.modules import ROOT_NAME, set_submodule
from workbench.engine.prepare import FP32, QUANTIZED, LayerPlan, insert_quantizers, plan_layers
from workbench.engine.quantizers import OBSERVE, QUANTIZE, ActivationQuantizer
from workbench.errors import CalibrationError, ConfigError, ModelError


def resolve_config(config: QuantConfig | str | None) -> QuantConfig:
    if config is None:
        return QuantConfig.preset("int8")
    if isinstance(config, str):
        return QuantConfig.preset(config)
    if not isinstance(config, QuantConfig):
        raise ConfigError(
            f"config must be a QuantConfig or a preset name, got {type(config).__name__}"
        )
    return config


def check_model(model: Any) -> None:
    """A clear error for anything that is not a usable nn.Module."""
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model itself"
        )
    for name, param in model.named_parameters():
        check_finite(param.detach(), f"parameter {name!r} of the model")
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():  # BatchNorm statistics end up in the folded weights
            check_finite(buffer.detach(), f"buffer {name!r} of the model")


def set_activation_mode(model: nn.Module, mode: str) -> None:
    for module in model.modules():
        if isinstance(module, ActivationQuantizer):
            module.mode = mode


def prepare_model(
    model: nn.Module, first_batch: Any, config: QuantConfig
) -> tuple[nn.Module, nn.Module, list[LayerPlan]]:
    """Deep-copy, fold BN, and insert quantizers. Returns (fp32 reference, prepared, plans)."""
    fp32_model = copy.deepcopy(model).eval()
    folded = fold_batchnorms(fp32_model, first_batch)
    plans = plan_layers(fp32_model, config, folded)
    if not any(plan.status == QUANTIZED for plan in plans):
        types = sorted({plan.layer_type for plan in plans}) or ["none"]
        raise ModelError(
            "the model has no layer to quantize (supported: Linear, Conv1d, Conv2d, Conv3d; "
            f"found: {', '.join(types)}); check config.exclude or pass a model with such layers"
        )
    prepared = copy.deepcopy(fp32_model)
    prepared = insert_quantizers(prepared, plans, config)
    insert_output_quantizers(prepared, first_batch, config, folded)
    return fp32_model, prepared, plans


def calibrate(model: nn.Module, batches: list[Any], progress: bool = True) -> set[str]:
    """Run calibration batches with observers on; returns the names of layers that ran.

    Raises a ``CalibrationError`` when no quantizable layer ran at all.
    """
    reached: set[str] = set()
    handles = []
    for _, layer in iter_quantized_layers(model):
        handles.append(
            layer.register_forward_pre_hook(lambda m, _inputs: reached.add(m.layer_name))
        )
        # weights do not change while calibrating: their qparams once, not at every batch
        layer.weight_quantizer.freeze(layer.layer.weight)
    set_activation_mode(model, OBSERVE)
    try:
        with torch.no_grad():
            for index, batch in enumerate(tqdm(batches, desc="calibrating", disable=not progress)):
                run_model(model, batch, index)
    finally:
        for handle in handles:
            handle.remove()
    if not reached:
        raise CalibrationError(
            "no quantizable layer ran on the calibration data; check that the calibration "
            "batches feed the model's forward"
        )
    return reached


def finish_calibration(model: nn.Module, plans: list[LayerPlan], reached: set[str]) -> None:
    """Fix qparams, freeze weights, and put layers never reached back to FP32."""
    for name, layer in list(iter_quantized_layers(model)):
        if name not in reached:
            if name == ROOT_NAME:
                continue
            set_submodule(model, name, layer.layer)
            for plan in plans:
                if plan.name == name:
                    plan.status, plan.note = FP32, "never called on the calibration data"
            continue
        if not layer.weight_quantizer.frozen:
            layer.weight_quantizer.freeze(layer.layer.weight)
        if layer.input_quantizer is not None:
            layer.input_quantizer.calibrate()
    finish_output_quantizers(model)
    set_activation_mode(model, QUANTIZE)
