"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models").

A few input channels of a transformer's Linears are far wider than the rest (outliers after
the LayerNorms); a per-tensor activation scale set by them leaves the other channels a few
levels. ``X W^T = (X diag(1/s)) (W diag(s))^T`` for any ``s > 0``, so dividing input channel
``j`` by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and multiplying the weight's input column ``j`` by it moves the difficulty from the
activation to the weight (per-channel weight scales absorb it better). ``alpha`` in [0, 1];
``"auto"`` picks it per group from a grid, minimising the group's quantized output error on
the calibration inputs.

Where ``1/s`` goes (``SmoothingGroup.fold``), found from the data flow of one forward pass:

* ``"layernorm"``: the Linears read a LayerNorm's output and nothing else does (pre-LN blocks:
  GPT-2, ViT, OPT; a LayerNorm before an ``nn.Sequential`` Linear stack): its weight and bias
  are divided by ``s``. The Linears sharing it (query, key, value) share one ``s``.
* ``"linear"``: the Linears read a Linear's output and nothing else does: that Linear's output
  rows (weight and bias) are divided by ``s``.
* ``"mul"``: a LayerNorm's or Linear's output also feeds something else, e.g. the residual add
  of a post-LN block (BERT, DistilBERT, RoBERTa): dividing it would change that path, so each
  Linear multiplies its own input by ``1/s`` (``SmoothedLinear``: one elementwise ``Mul`` in
  the exported graph, before the input's QuantizeLinear).

Where the input comes from anything else (GELU, the attention's matmul, the model's input),
the group is not smoothed and ``skipped`` holds the reason (one of ``SKIP_REASONS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workbench.core.fake_quant import fake_quantize
from workbench.core.qparams import qparams_from_range
from workbench.core.scheme import Scheme
from workbench.engine.calibration.batches import first_samples, run_model
from workbench.engine.capture.modules import get_layer, writable
from workbench.engine.placement.data_flow import trace_data_flow

AUTO_ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))
FLOOR = 1e-5  # max|X_j| or max|W_j| below this: channel j is left as it is (s_j = 1)
SAMPLE_ROWS = 1024  # input rows kept per group for alpha="auto"
FOLD_LAYERNORM, FOLD_LINEAR, FOLD_MUL = "layernorm", "linear", "mul"
SKIP_INPUT_OF_MODEL = "input of the model"
SKIP_OTHER_PRODUCER = "input not from a LayerNorm or Linear"
SKIP_CALLED_TWICE = "called more than once"
SKIP_NOT_CALLED = "never called on the calibration data"
SKIP_REASONS = (SKIP_INPUT_OF_MODEL, SKIP_OTHER_PRODUCER, SKIP_CALLED_TWICE, SKIP_NOT_CALLED)


class SmoothedLinear(nn.Linear):
    """A Linear whose input is multiplied by ``input_scale`` (``1 / s`` per input channel)
    before its weight (``W diag(s)``): a smoothing that cannot be folded into the layer
    before it (``FOLD_MUL``; one ``Mul`` in the exported graph). The layer keeps its name;
    ``engine.placement.layers.smoothed_input`` applies the scale wherever the layer's weight is used
    without its forward."""

    input_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.input_scale)


def _smoothed_class(layer: nn.Linear) -> type:
    """``SmoothedLinear`` over the layer's own class (a GPT-2 ``Conv1DLinear`` stays one)."""
    if isinstance(layer, SmoothedLinear):
        return type(layer)
    if type(layer) is nn.Linear:
        return SmoothedLinear
    return type(f"Smoothed{type(layer).__name__}", (SmoothedLinear, type(layer)), {})


def _smooth_with_mul(layer: nn.Linear, scale: torch.Tensor) -> None:
    layer.__class__ = _smoothed_class(layer)
    layer.register_buffer("input_scale", (1.0 / scale).to(torch.float32))


@dataclass
class SmoothingGroup:
    """Linears reading one tensor; ``producer`` made it (None: the model's input)."""

    layers: list[str]
    producer: str | None
    fold: str | None = None  # FOLD_LAYERNORM / FOLD_LINEAR / FOLD_MUL; None when skipped
    skipped: str | None = None  # one of SKIP_REASONS
    alpha: float | None = None
    scale: torch.Tensor | None = field(default=None, repr=False)


def _is_layernorm(module: nn.Module | None) -> bool:
    return isinstance(module, nn.LayerNorm) and module.weight is not None


def find_smoothing_groups(
    model: nn.Module, batch: Any, layer_names: set[str]
) -> list[SmoothingGroup]:
    """Group the Linears ``layer_names`` (quantized with an input quantizer) by the tensor they
    read, and say where each group's smoothing can go."""
    flow = trace_data_flow(model, first_samples(batch))
    producers, consumers = flow.producer(), flow.consumers()
    by_input: dict[Any, list[str]] = {}
    twice: list[str] = []
    for node in flow.nodes:
        if node.kind != "module" or node.name not in layer_names or not node.inputs:
            continue
        if not isinstance(node.module, nn.Linear):
            continue
        if flow.calls.get(node.name, 0) != 1:
            twice.append(node.name)
            continue
        by_input.setdefault(node.inputs[0], []).append(node.name)
    groups = [SmoothingGroup([name], None, skipped=SKIP_CALLED_TWICE) for name in twice]
    for key, names in by_input.items():
        producer = producers.get(key)
        group = SmoothingGroup(names, producer.name if producer is not None else None)
        groups.append(group)
        if producer is None:
            group.skipped = SKIP_INPUT_OF_MODEL
            continue
        module = producer.module if producer.kind == "module" else None
        foldable = _is_layernorm(module) or (
            isinstance(module, nn.Linear) and len(producer.outputs) == 1
        )
        if not foldable:
            group.skipped = SKIP_OTHER_PRODUCER
            continue
        readers = {user.name for user in consumers.get(key, [])}
        sole_reader = readers <= set(names) and flow.calls.get(producer.name, 0) == 1
        if not sole_reader:
            group.fold = FOLD_MUL
        else:
            group.fold = FOLD_LAYERNORM if _is_layernorm(module) else FOLD_LINEAR
    return groups


@dataclass
class _InputStatistics:
    low: torch.Tensor  # per channel
    high: torch.Tensor
    rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def amax(self) -> torch.Tensor:
        return torch.maximum(self.low.abs(), self.high.abs())


def _input_statistics(
    model: nn.Module, groups: list[SmoothingGroup], batches: list[Any], keep_rows: bool
) -> dict[int, _InputStatistics]:
    """Per-channel min / max of each group's input over ``batches`` (and sample rows)."""
    found: dict[int, _InputStatistics] = {}
    handles = []

    def hook_for(index: int):
        def hook(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            low, high = x.amin(dim=0), x.amax(dim=0)
            stats = found.get(index)
            if stats is None:
                found[index] = stats = _InputStatistics(low, high)
            else:
                stats.low, stats.high = (
                    torch.minimum(stats.low, low),
                    torch.maximum(stats.high, high),
                )
            kept = sum(len(r) for r in stats.rows)
            if keep_rows and kept < SAMPLE_ROWS:
                stats.rows.append(x[: SAMPLE_ROWS - kept].clone())

        return hook

    for index, group in enumerate(groups):
        layer = get_layer(model, group.layers[0])
        handles.append(layer.register_forward_pre_hook(hook_for(index)))
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                run_model(model, batch, index)
    finally:
        for handle in handles:
            handle.remove()
    return found


def smoothing_scale(amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; 1 where either range is (near) 0."""
    usable = (amax > FLOOR) & (wmax > FLOOR)
    scale = amax.clamp_min(FLOOR) ** alpha / wmax.clamp_min(FLOOR) ** (1 - alpha)
    return torch.where(usable, scale, torch.ones_like(scale))


def _group_weights(model: nn.Module, group: SmoothingGroup) -> list[torch.Tensor]:
    return [get_layer(model, name).weight.detach() for name in group.layers]


def _quantized_error(
    weights: list[torch.Tensor],
    stats: _InputStatistics,
    scale: torch.Tensor,
    activation: Scheme,
    weight_scheme: Scheme,
) -> float:
    """Squared error of the group's outputs on the sample rows with ``scale`` applied."""
    x = torch.cat(stats.rows)
    act_scale, act_zero = qparams_from_range(
        (stats.low / scale).min(), (stats.high / scale).max(), activation
    )
    xq = fake_quantize(x / scale, act_scale, act_zero, activation)
    error = 0.0
    for weight in weights:
        smoothed = weight * scale
        if weight_scheme.per_channel:
            low, high = smoothed.amin(dim=1), smoothed.amax(dim=1)
        else:
            low, high = smoothed.min(), smoothed.max()
        w_scale, w_zero = qparams_from_range(low, high, weight_scheme)
        wq = fake_quantize(smoothed, w_scale, w_zero, weight_scheme)
        error += float(((x @ weight.t()) - (xq @ wq.t())).square().sum())
    return error


def _choose_alpha(
    weights: list[torch.Tensor],
    stats: _InputStatistics,
    activation: Scheme,
    weight_scheme: Scheme,
) -> float:
    wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    errors = {
        alpha: _quantized_error(
            weights, stats, smoothing_scale(stats.amax, wmax, alpha), activation, weight_scheme
        )
        for alpha in AUTO_ALPHAS
    }
    return min(errors, key=errors.get)


def _apply(model: nn.Module, group: SmoothingGroup, scale: torch.Tensor) -> None:
    for name in group.layers:
        writable(get_layer(model, name), "weight").mul_(scale)
    if group.fold == FOLD_LAYERNORM:
        norm = get_layer(model, group.producer)
        writable(norm, "weight").div_(scale)
        if norm.bias is not None:
            writable(norm, "bias").div_(scale)
    elif group.fold == FOLD_LINEAR:
        producer = get_layer(model, group.producer)
        writable(producer, "weight").div_(scale[:, None])
        if producer.bias is not None:
            writable(producer, "bias").div_(scale)
    else:
        for name in group.layers:
            _smooth_with_mul(get_layer(model, name), scale)


def smooth_model(
    model: nn.Module,
    batches: list[Any],
    alpha: float | str,
    layer_names: set[str],
    activation: Scheme,
    weight_schemes: dict[str, Scheme],
) -> list[SmoothingGroup]:
    """SmoothQuant on ``model`` in place (a copy: its FP32 function does not change).

    ``layer_names`` are the Linears quantized with an input quantizer, ``weight_schemes``
    their weight schemes (for ``alpha="auto"``); ``batches`` give the activation ranges.
    Returns every group, smoothed or skipped with its reason.
    """
    groups = find_smoothing_groups(model, batches[0], layer_names)
    smoothable = [group for group in groups if group.skipped is None]
    stats = _input_statistics(model, smoothable, batches, keep_rows=alpha == "auto")
    with torch.no_grad():
        for index, group in enumerate(smoothable):
            found = stats.get(index)
            if found is None:  # never ran on the calibration data
                continue
            weights = _group_weights(model, group)
            chosen = alpha
            if alpha == "auto":
                chosen = _choose_alpha(weights, found, activation, weight_schemes[group.layers[0]])
            wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
            scale = smoothing_scale(found.amax, wmax, float(chosen))
            _apply(model, group, scale)
            group.alpha, group.scale = float(chosen), scale
    return groups


def mark_smoothed(plans: list, groups: list[SmoothingGroup]) -> None:
    """Set the smoothing fields of the plans."""
    by_name = {plan.name: plan for plan in plans}
    for group in groups:
        for name in group.layers:
            plan = by_name.get(name)
            if plan is None:
                continue
            if group.alpha is None:
                plan.smoothing_skipped = group.skipped or SKIP_NOT_CALLED
                continue
            plan.smoothing_alpha = group.alpha
            plan.smoothing_fold = group.fold
