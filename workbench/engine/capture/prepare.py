"""Capture a model for quantization by module swapping.

Each supported layer (Linear, Conv1d/2d/3d; transformers' Conv1D is swapped for the Linear it
computes beforehand, ``engine.capture.conv1d``) is replaced in a deep copy of the model by a
``QuantizedLayer`` holding the original module plus its quantizers. Everything else stays as
it was, so any model that runs in eager PyTorch (control flow, keyword inputs, transformers
models) can be quantized, and every layer keeps its name for the reports.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from workbench.engine.capture.bn_fold import BN_TYPES
from workbench.engine.capture.conv1d import layer_type_name
from workbench.engine.capture.lm_head import lm_head_names
from workbench.engine.capture.modules import ROOT_NAME, get_layer, set_submodule
from workbench.engine.config import QuantConfig
from workbench.engine.placement.layers import QuantizedEmbedding, QuantizedLayer
from workbench.engine.placement.op_kinds import layer_kind
from workbench.engine.quantizers.dynamic import CONV_NOTE, DynamicActivationQuantizer
from workbench.engine.quantizers.modules import ActivationQuantizer, WeightQuantizer
from workbench.errors import ConfigError

QUANTIZED, FP32 = "quantized", "fp32"


@dataclass
class LayerPlan:
    """What happens to one layer that holds parameters.

    Facts are fields: code reads ``folded_into`` (and, for per-layer precision, the bit
    widths), never the rendered ``reason``. ``note`` says why in words when no field does.
    """

    name: str
    layer_type: str
    status: str
    note: str = ""
    folded_into: str | None = None  # a BatchNorm folded into this conv / linear
    weight_bits: int | None = None  # per-layer precision (config.schemes_for) when quantized
    activation_bits: int | None = None  # None: FP32 input (weight-only)
    # the layer whose higher precision its input quantizer took (one quantizer feeding both)
    activation_raised_by: str | None = None
    equalized: bool = False  # scaled by cross-layer equalization (engine.algorithms.equalize)
    # SmoothQuant (engine.algorithms.smoothquant): the alpha applied and where 1/s went
    # ("layernorm",
    # "linear" or "mul"), or why the layer was not smoothed (smoothquant.SKIP_REASONS)
    smoothing_alpha: float | None = None
    smoothing_fold: str | None = None
    smoothing_skipped: str | None = None
    bias_corrected: bool = False  # expected output error removed from the bias
    weight_rounding: str | None = None  # "nearest" / "adaround" / "gptq" when quantized
    # per output channel, the expected mean and std of the layer's output, from the BatchNorm
    # folded into it (its beta and |gamma|), rescaled by equalization: what analytic bias
    # correction assumes of the next layer's input (engine.algorithms.bias_correction)
    output_mean: torch.Tensor | None = field(default=None, repr=False, compare=False)
    output_std: torch.Tensor | None = field(default=None, repr=False, compare=False)

    kept_bits: int | None = None  # an override holds it above the config's widths
    lm_head: bool = False  # a language model's head (model.get_output_embeddings())

    @property
    def precision(self) -> str:
        """``quantized``, ``kept 8-bit`` (above the config's widths), ``kept FP32``, ``folded``."""
        if self.folded_into is not None:
            return "folded"
        if self.status != QUANTIZED:
            return "kept FP32"
        return f"kept {self.kept_bits}-bit" if self.kept_bits is not None else QUANTIZED

    @property
    def reason(self) -> str:
        """Why the layer is (not) quantized as it is, rendered for the reports."""
        if self.folded_into is not None:
            return f"folded into {self.folded_into}"
        if self.activation_raised_by is not None:
            raised = (
                f"input at {self.activation_bits} bits: its input quantizer also serves "
                f"{self.activation_raised_by}, whose higher precision wins"
            )
            return f"{self.note}; {raised}" if self.note else raised
        return self.note


def matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a layer name is one of ``patterns`` or matches one as a glob (``config.exclude``)."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _functional_owner_names(model: nn.Module) -> set[str]:
    """Layers whose weights a parent uses functionally (swapping them would have no effect)."""
    owned: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child_name, _ in module.named_modules():
                if child_name:
                    owned.add(f"{name}.{child_name}" if name else child_name)
    return owned


def _plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` that looks up the ids it is given: ``QuantizedEmbedding`` computes
    that forward, not a subclass's own (OPT's learned positions take the attention mask)."""
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward


# the forward each quantized layer type computes (QuantizedLayer: op(Q(x), Q_w(W), b))
BASE_FORWARDS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def own_forward_base(module: nn.Module) -> type[nn.Module] | None:
    """The base layer type whose forward a subclass replaces with a different computation
    (timm's weight-standardized ``StdConv2d``, a scaled Linear), None when it computes the
    base's. QuantizedLayer computes the base's forward, so such a layer is kept FP32.

    A subclass whose forward only spells the base's computation differently (transformers'
    ``FalconLinear``: ``x @ W.T + b``) is recognised by running both on a probe input: it is
    quantized like its base."""
    for base in BASE_FORWARDS:
        if isinstance(module, base):
            methods = ("forward", "_conv_forward") if base is not nn.Linear else ("forward",)
            if all(getattr(type(module), m) is getattr(base, m) for m in methods):
                return None
            return None if _computes_base_forward(module, base) else base
    return None


def _computes_base_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    generator = torch.Generator().manual_seed(0)
    weight = module.weight
    if base is nn.Linear:
        shape = (3, weight.shape[1])
    else:
        spatial = [
            (k - 1) * d + 1 + s
            for k, d, s in zip(module.kernel_size, module.dilation, module.stride, strict=True)
        ]
        shape = (2, weight.shape[1] * module.groups, *spatial)
    probe = torch.randn(shape, generator=generator).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            own, expected = type(module).forward(module, probe), base.forward(module, probe)
    except Exception:  # a forward that needs more than one tensor: not the base's
        return False
    if not isinstance(own, torch.Tensor) or own.shape != expected.shape:
        return False
    scale = float(expected.abs().max()) or 1.0
    return bool(torch.allclose(own, expected, rtol=1e-4, atol=1e-5 * scale))


def plan_layers(
    model: nn.Module, config: QuantConfig, folded_bn: dict[str, str] | None = None
) -> list[LayerPlan]:
    """Decide, for every module holding parameters, whether it is quantized and why not."""
    folded_bn = folded_bn or {}
    functional = _functional_owner_names(model)
    heads = lm_head_names(model)
    plans: list[LayerPlan] = []
    for name, module in model.named_modules():
        name = name or ROOT_NAME
        type_name = layer_type_name(module)
        embedding = config.quantize_embeddings and _plain_embedding(module)
        if layer_kind(module) is not None or embedding:
            if name in functional:
                reason = "used functionally by MultiheadAttention"
                plans.append(LayerPlan(name, type_name, FP32, reason))
            elif matches_any(name, config.exclude):
                plans.append(LayerPlan(name, type_name, FP32, "excluded by config"))
            elif (base := own_forward_base(module)) is not None:
                reason = (
                    f"{type_name} has its own forward (a quantized layer would compute "
                    f"{base.__name__}'s in its place): kept FP32"
                )
                plans.append(LayerPlan(name, type_name, FP32, reason))
            elif name in heads and not config.quantize_lm_head:
                reason = "LM head kept FP32 by config (quantize_lm_head=False)"
                plans.append(LayerPlan(name, type_name, FP32, reason))
            else:
                _check_blockwise(name, module, config)
                plan = _quantized_plan(name, type_name, config, embedding)
                if config.dynamic and not isinstance(module, nn.Linear | nn.Embedding):
                    plan.activation_bits, plan.note = None, CONV_NOTE
                plans.append(plan)
        elif any(True for _ in module.parameters(recurse=False)):
            if isinstance(module, BN_TYPES):
                reason = "BatchNorm not folded (its input is not a conv output used only by it)"
            elif isinstance(module, nn.Embedding) and config.quantize_embeddings:
                reason = (
                    f"{type_name} has its own forward (it computes the rows it looks up, as "
                    "OPT's learned positions do): kept FP32"
                )
            elif isinstance(module, nn.Embedding):
                reason = (
                    f"{type_name} is not a quantized layer type "
                    "(QuantConfig(quantize_embeddings=True) stores it as integers)"
                )
            else:
                reason = f"{type_name} is not a quantized layer type"
            plans.append(LayerPlan(name, type_name, FP32, reason))
    for plan in plans:
        plan.lm_head = plan.name in heads
    for bn_name, conv_name in folded_bn.items():
        plans.append(LayerPlan(bn_name, "BatchNorm", FP32, folded_into=conv_name))
    return plans


def _check_blockwise(name: str, module: nn.Module, config: QuantConfig) -> None:
    """Block-wise weight schemes (``group_size``) are for Linear weights and embedding tables
    (groups along each row): a conv raises one clear error."""
    weight, _ = config.schemes_for(name)
    if weight.group_size is None or isinstance(module, nn.Linear | nn.Embedding):
        return
    per_channel = f"wb.Scheme({weight.bits}, {weight.symmetric}, True)"
    raise ConfigError(
        f"layer {name!r} is a {type(module).__name__}: block-wise weights (group_size="
        f"{weight.group_size}) apply to Linear layers only; give it a per-channel scheme with "
        f"overrides={{{name!r}: {{'weight': {per_channel}}}}} or exclude it"
    )


def _quantized_plan(name: str, type_name: str, config: QuantConfig, embedding: bool) -> LayerPlan:
    """The plan of a quantized layer at its own precision (``config.overrides``)."""
    weight, activation = config.schemes_for(name)
    if embedding:
        activation = None  # an embedding's input is ids: weight-only
    plan = LayerPlan(
        name,
        type_name,
        QUANTIZED,
        weight_bits=weight.bits,
        activation_bits=activation.bits if activation is not None else None,
    )
    config_act = config.activation.bits if config.activation is not None else 0
    higher_weight = weight.bits > config.weight.bits
    higher_act = activation is not None and activation.bits > config_act
    if higher_weight or higher_act:
        plan.kept_bits = max(weight.bits, activation.bits if activation is not None else 0)
        plan.note = "precision set by config.overrides"
    elif (weight, activation) != (config.weight, config.activation):
        plan.note = "precision set by config.overrides"
    return plan


def insert_quantizers(model: nn.Module, plans: list[LayerPlan], config: QuantConfig) -> nn.Module:
    """Swap every layer planned as quantized for a ``QuantizedLayer``; returns the model
    (a new object only when the model itself is a single supported layer)."""
    for plan in plans:
        if plan.status != QUANTIZED:
            continue
        layer = get_layer(model, plan.name)
        weight_scheme, activation_scheme = config.schemes_for(plan.name)
        weight_quantizer = WeightQuantizer(
            weight_scheme, config.weight_observer, f"weight of {plan.name}"
        )
        if isinstance(layer, nn.Embedding):
            group = weight_scheme.group_size
            if group is not None and layer.weight.shape[1] % group:  # rows of whole groups only
                weight_quantizer = WeightQuantizer(
                    replace(weight_scheme, group_size=None),
                    config.weight_observer,
                    f"weight of {plan.name}",
                )
            wrapped = QuantizedEmbedding(layer, plan.name, weight_quantizer)
        else:
            input_quantizer = None
            if config.dynamic and activation_scheme is not None:
                if isinstance(layer, nn.Linear):  # convs: weight-only (CONV_NOTE)
                    input_quantizer = DynamicActivationQuantizer(f"input of {plan.name}")
            elif activation_scheme is not None:
                input_quantizer = ActivationQuantizer(
                    activation_scheme, config.observer, f"input of {plan.name}", config.percentile
                )
            wrapped = QuantizedLayer(layer, plan.name, weight_quantizer, input_quantizer)
        if plan.name == ROOT_NAME:
            return wrapped
        set_submodule(model, plan.name, wrapped)
    return model
