"""PTQ steps on a model: deep copy, fold BN, insert quantizers, calibrate."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.engine.algorithms.equalize import equalize_model, mark_equalized
from workbench.engine.algorithms.smoothquant import mark_smoothed, smooth_model
from workbench.engine.calibration.batches import run_model
from workbench.engine.capture.bn_fold import bn_output_statistics, fold_batchnorms
from workbench.engine.capture.constant_inputs import CONSTANT_INPUT_NOTE, layers_with_constant_input
from workbench.engine.capture.conv1d import linearize_conv1d
from workbench.engine.capture.modules import (
    ROOT_NAME,
    get_layer,
    hooks_removed,
    set_submodule,
    shared_copy,
)
from workbench.engine.capture.prepare import (
    FP32,
    QUANTIZED,
    LayerPlan,
    insert_quantizers,
    matches_any,
    plan_layers,
)
from workbench.engine.capture.stand_in_check import (
    STAND_IN_NOTE,
    stand_ins_that_change_the_model,
    unwrap,
)
from workbench.engine.config import QuantConfig
from workbench.engine.placement.graph_quantizers import (
    finish_output_quantizers,
    insert_output_quantizers,
)
from workbench.engine.placement.layers import iter_quantized_layers
from workbench.engine.placement.op_kinds import LAYER_TYPE_NAMES
from workbench.engine.quantizers.modules import OBSERVE, QUANTIZE, ActivationQuantizer
from workbench.engine.training.distributed import Job, combine_calibration
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


def set_activation_mode(model: nn.Module, mode: str) -> None:
    for module in model.modules():
        if isinstance(module, ActivationQuantizer):
            module.mode = mode


def prepare_model(
    model: nn.Module,
    first_batch: Any,
    config: QuantConfig,
    batches: list[Any] | None = None,
    share_weights: bool = False,
) -> tuple[nn.Module, nn.Module, list[LayerPlan]]:
    """Copy, fold BN, and insert quantizers. Returns (fp32 reference, prepared, plans).

    ``first_batch`` None (dynamic mode without calibration data): no BatchNorm folding, whose
    conv -> BN pairs come from tracing a batch. ``batches`` (default: the first one) give
    SmoothQuant its activation ranges. ``share_weights`` (PTQ): the two models share the
    tensors of ``model`` that no step changes (``modules.shared_copy``) instead of deep
    copies; a step that changes a tensor (BN folding, equalization, SmoothQuant, bias
    correction) gives the model it changes its own copy first (``modules.writable``)."""
    copy_of = shared_copy if share_weights else copy.deepcopy  # buffers: already our own
    # transformers' Conv1D (GPT-2) is quantized as the Linear it computes, in every step
    fp32_model = linearize_conv1d(copy_of(model)).eval()
    folded = fold_batchnorms(fp32_model, first_batch) if first_batch is not None else {}
    plans = plan_layers(fp32_model, config, folded)
    by_name = {plan.name: plan for plan in plans}
    for bn_name, layer_name in folded.items():  # ``model`` still holds the BatchNorms
        plan = by_name[layer_name]
        plan.output_mean, plan.output_std = bn_output_statistics(model.get_submodule(bn_name))
    reference = None  # the FP32 model's output on the first batch
    if first_batch is not None:
        reference = _keep_constant_input_layers_fp32(fp32_model, plans, first_batch)
    check_plans(fp32_model, plans, config)
    if config.equalize:
        mark_equalized(plans, equalize_model(fp32_model, first_batch))
    if config.smoothquant is not None and first_batch is not None:
        _smooth(fp32_model, plans, config, batches or [first_batch])
    if not any(plan.status == QUANTIZED for plan in plans):
        types = sorted({plan.layer_type for plan in plans}) or ["none"]
        tables = [m for m in fp32_model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)]
        hint = (
            "; its embedding tables are quantized with QuantConfig(quantize_embeddings=True)"
            if tables and not config.quantize_embeddings
            else ""
        )
        raise ModelError(
            f"the model has no layer to quantize (supported: {LAYER_TYPE_NAMES}; "
            f"found: {', '.join(types)}); check config.exclude or pass a model with such "
            f"layers{hint}"
        )
    prepared = copy_of(fp32_model)
    prepared = insert_quantizers(prepared, plans, config)
    if first_batch is not None:
        for name in stand_ins_that_change_the_model(reference, prepared, first_batch):
            unwrap(prepared, name)
            plan = by_name[name]
            plan.status, plan.note = FP32, STAND_IN_NOTE.format(type=plan.layer_type)
            plan.weight_bits = plan.activation_bits = plan.kept_bits = None
    # dynamic mode: no static quantizer anywhere, so no output quantizers after convs / adds
    sites: list[str] = []
    raised = (
        {}
        if config.dynamic
        else insert_output_quantizers(prepared, first_batch, config, folded, sites)
    )
    for plan in plans:
        if plan.name in raised:
            layer = get_layer(prepared, plan.name)
            plan.activation_bits = layer.input_quantizer.scheme.bits
            plan.activation_raised_by = raised[plan.name]
    check_override_patterns(sites, plans, config)
    return fp32_model, prepared, plans


def _keep_constant_input_layers_fp32(
    model: nn.Module, plans: list[LayerPlan], batch
) -> torch.Tensor | None:
    """Layers with an input quantizer whose input is computed from weights only are kept FP32
    (``engine.capture.constant_inputs``); returns the model's main output on ``batch``."""
    candidates = [
        plan
        for plan in plans
        if plan.status == QUANTIZED
        and plan.activation_bits is not None
        and not isinstance(get_layer(model, plan.name), nn.Embedding)
    ]
    names = [plan.name for plan in candidates]
    constant, output = layers_with_constant_input(model, batch, names)
    for plan in candidates:
        if plan.name in constant:
            plan.status, plan.note = FP32, CONSTANT_INPUT_NOTE
            plan.weight_bits = plan.activation_bits = plan.kept_bits = None
    return output


def check_override_patterns(sites: list[str], plans: list[LayerPlan], config: QuantConfig):
    """An overrides pattern that matches no layer and no quantizer site is a typo: an error
    naming both lists (a site pattern only matches once the sites are placed)."""
    names = [plan.name for plan in plans]
    for pattern in config.overrides:
        if any(matches_any(name, (pattern,)) for name in names + sites):
            continue
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        sites_shown = ", ".join(sites[:6]) + (", ..." if len(sites) > 6 else "")
        raise ConfigError(
            f"config.overrides pattern {pattern!r} matches no layer of the model; "
            f"use layer names as in report.layers (this model's: {shown})"
            + (f" or site names as in report.sites ({sites_shown})" if sites else "")
        )


def _smooth(model: nn.Module, plans: list[LayerPlan], config: QuantConfig, batches) -> None:
    """SmoothQuant on the Linears quantized with an input quantizer
    (``engine.algorithms.smoothquant``)."""
    names = {
        plan.name for plan in plans if plan.status == QUANTIZED and plan.activation_bits is not None
    }
    if config.activation is None or not names:
        return
    schemes = {name: config.schemes_for(name)[0] for name in names}
    groups = smooth_model(model, batches, config.smoothquant, names, config.activation, schemes)
    mark_smoothed(plans, groups)


def check_plans(model: nn.Module, plans: list[LayerPlan], config: QuantConfig) -> None:
    """Exclude patterns that match no layer (a typo would quietly quantize the layer meant to
    stay FP32) and layers with nothing to quantize are errors naming the layer."""
    names = [plan.name for plan in plans]
    for pattern in config.exclude:
        if not any(matches_any(name, (pattern,)) for name in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(
                f"config.exclude pattern {pattern!r} matches no layer of the model; "
                f"use layer names as in report.layers (this model's: {shown})"
            )
    if not config.quantize_lm_head and not any(plan.lm_head for plan in plans):
        raise ConfigError(
            "QuantConfig(quantize_lm_head=False), but the model has no LM head (no module "
            "returns one from get_output_embeddings()); keep quantize_lm_head=True and name "
            "the output layer in config.exclude instead"
        )
    for plan in plans:
        if plan.status != QUANTIZED:
            continue
        weight = getattr(get_layer(model, plan.name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() == 0:
            raise ModelError(
                f"layer {plan.name!r} ({plan.layer_type}) has an empty weight of shape "
                f"{list(weight.shape)}: nothing to quantize; remove the layer or add "
                f"{plan.name!r} to config.exclude"
            )


def calibrate(
    model: nn.Module,
    batches: list[Any],
    progress: bool = True,
    job: Job | None = None,
    probe: Any = None,
) -> set[str]:
    """Run calibration batches with observers on; returns the names of layers that ran.

    In a distributed ``job`` every process runs its own batches, then the observers combine
    their statistics over the processes (``engine.training.distributed``), so all end with the same
    qparams. Raises a ``CalibrationError`` when no quantizable layer ran at all.

    Without an activation quantizer to observe (weight-only and dynamic configs) there is
    nothing to calibrate: only the first batch runs, with FP32 weights, to find the layers the
    model calls; or ``probe`` when given (a large model's first tokens, ``calibration.probe``).
    """
    weight_only = not needs_activation_calibration(model)
    if weight_only:
        batches = [probe] if probe is not None else _first_of(batches)
    reached: set[str] = set()
    handles = []
    switched_off = []
    for _, layer in iter_quantized_layers(model):
        handles.append(
            layer.register_forward_pre_hook(lambda m, _inputs: reached.add(m.layer_name))
        )
        # weights do not change while calibrating: their qparams once, not at every batch
        layer.weight_quantizer.freeze(layer.layer.weight)
        if weight_only and layer.weight_quantizer.enabled:
            layer.weight_quantizer.enabled = False  # nothing observes the outputs
            switched_off.append(layer.weight_quantizer)
    set_activation_mode(model, OBSERVE)
    try:
        with hooks_removed(handles), torch.no_grad():
            for index, batch in enumerate(tqdm(batches, desc="calibrating", disable=not progress)):
                run_model(model, batch, index)
    finally:
        for quantizer in switched_off:
            quantizer.enabled = True
    if job is not None:
        reached = combine_calibration(model, reached, job)
    if not reached:
        raise CalibrationError(
            "no quantizable layer ran on the calibration data; check that the calibration "
            "batches feed the model's forward"
        )
    return reached


def needs_activation_calibration(model: nn.Module) -> bool:
    """Whether ``model`` has an activation quantizer whose range comes from calibration data
    (not weight-only, not dynamic)."""
    return any(
        isinstance(module, ActivationQuantizer) and not module.dynamic and not module.calibrated
        for module in model.modules()
    )


def _first_of(batches: Any) -> list[Any]:
    for batch in batches:
        return [batch]
    return []


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
            warn_if_degenerate(layer.input_quantizer)
            layer.input_quantizer.calibrate()
    for module in model.modules():  # the output quantizers placed after layers
        if isinstance(module, ActivationQuantizer) and module.observer is not None:
            warn_if_degenerate(module)
    finish_output_quantizers(model)
    set_activation_mode(model, QUANTIZE)


def warn_if_degenerate(quantizer: ActivationQuantizer) -> None:
    """A warning naming the layer whose calibration input never varied (all zeros, one
    constant): its scale fits no real input."""
    observer = quantizer.observer
    if observer is None or observer.batches_seen == 0:
        return
    low = getattr(observer, "seen_min", None)
    high = getattr(observer, "seen_max", None)
    if getattr(observer, "min_val", None) is not None:
        low, high = float(observer.min_val.min()), float(observer.max_val.max())
    if low is None or low != high:
        return
    warnings.warn(
        f"{quantizer.tensor_name} was constant on the calibration data (every value {low:g}): "
        "its quantization range fits no other input; calibrate with representative data "
        "(real samples, not zeros or one repeated value)",
        RuntimeWarning,
        stacklevel=2,
    )
