"""Empirical bias correction (Nagel et al. 2019, section 4.2).

Quantizing a layer's weights (and its input) shifts the mean of its output:
``E[y_q] - E[y] != 0`` per output channel, and the next layers see that shift as a bias.
Here the shift is measured on the calibration batches and removed from the layer's bias:

    b_c  <-  b_c - (E[y_q, c] - E[y_fp32, c])

Layers are corrected in the order the forward pass runs them, each one measured in the
quantized model with the layers before it already quantized and corrected, so a correction
also absorbs the mean error its input carries. ``E[y_fp32]`` is the same layer's output in the
FP32 reference model. The layer's own output quantizer (if it holds one) is off while
measuring: the correction is of the pre-activation, as the bias enters before it. The
corrected bias is rounded back to the INT32 grid of ``s_input * s_weight``.

Analytic (data-free) bias correction (section 4.2 of the same paper) needs no measurement: a
layer's output error is ``(W_q - W) E[x]``, and where its input is ``act(y)`` of a layer whose
output went through a BatchNorm (folded into it), ``y`` is taken as Gaussian per channel with
the BatchNorm's ``beta`` and ``|gamma|`` (``LayerPlan.output_mean`` / ``output_std``, rescaled
by equalization). For ``x = min(max(y, 0), u)`` with ``y ~ N(mu, sigma^2)``:

    E[max(y, 0)] = sigma phi(mu / sigma) + mu Phi(mu / sigma)
    E[x]         = E[max(y, 0)] - E[max(y - u, 0)]

(``u`` = 6 for ReLU6, the per-channel bound of an equalized ReLU6, infinite for ReLU; ``x = y``
without an activation). Layers whose input has no such statistics (the first layer, one after
a residual add) are left as they are. It corrects the weights' rounding only, not the input's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from workbench.engine.algorithms.equalize import ChannelMinimum
from workbench.engine.calibration.batches import first_samples, run_model
from workbench.engine.capture.modules import find_submodule, writable
from workbench.engine.capture.prepare import LayerPlan
from workbench.engine.placement.data_flow import FlowNode, trace_data_flow
from workbench.engine.placement.graph_quantizers import round_bias
from workbench.engine.placement.layers import (
    QuantizedEmbedding,
    QuantizedLayer,
    iter_quantized_layers,
)
from workbench.engine.quantizers.modules import OFF

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def channel_sums(layer: nn.Module, output: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of ``output`` per output channel of ``layer`` (conv: axis 1, linear: last axis)
    and the number of values summed per channel."""
    layer = layer.layer if isinstance(layer, QuantizedLayer) else layer
    axis = 1 if isinstance(layer, CONV_TYPES) else -1
    moved = output.detach().to(torch.float64).movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    return flat.sum(dim=1), flat.shape[1]


class _ChannelMeans:
    """Per-channel output means of some modules over several forward passes (a hook each)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.order: list[str] = []
        self.handles = [
            module.register_forward_hook(self._hook(name)) for name, module in modules.items()
        ]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return
            sums, count = channel_sums(module, output)
            if name in self.sums and self.sums[name].shape == sums.shape:
                self.sums[name] += sums
            else:
                self.sums[name] = sums
            self.counts[name] = self.counts.get(name, 0) + count
            self.calls[name] = self.calls.get(name, 0) + 1
            if name not in self.order:
                self.order.append(name)

        return hook

    def mean(self, name: str) -> torch.Tensor | None:
        if name not in self.sums:
            return None
        return self.sums[name] / max(self.counts[name], 1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _run(model: nn.Module, batches: Sequence[Any]) -> None:
    with torch.no_grad():
        for index, batch in enumerate(batches):
            run_model(model, batch, index)


def mean_output_errors(
    fp32_model: nn.Module, quantized_model: nn.Module, batches: Sequence[Any]
) -> dict[str, torch.Tensor]:
    """``E[y_q] - E[y_fp32]`` per output channel of every quantized layer on ``batches``,
    each measured as bias correction measures it (its own output quantizer off)."""
    return _correct_in_order(fp32_model, quantized_model, batches, apply=False)


def correct_biases(
    fp32_model: nn.Module, quantized_model: nn.Module, batches: Sequence[Any]
) -> list[str]:
    """Empirical bias correction of ``quantized_model`` in place; returns the layers corrected,
    in the order they were corrected (the order the forward pass runs them)."""
    return list(_correct_in_order(fp32_model, quantized_model, batches, apply=True))


def _correct_in_order(
    fp32_model: nn.Module, quantized_model: nn.Module, batches: Sequence[Any], apply: bool
) -> dict[str, torch.Tensor]:
    """The mean output error of each layer in forward order, removed from its bias when
    ``apply``; returns ``{layer: error measured}``."""
    layers = _correctable_layers(quantized_model)
    reference = _ChannelMeans(_fp32_counterparts(fp32_model, layers))
    try:
        _run(fp32_model, batches)
    finally:
        reference.remove()
    # a layer run more than once per forward (a shared module) has no single bias to correct
    order = [name for name in reference.order if reference.calls[name] == len(batches)]
    errors = {}
    for name in order:
        layer = layers[name]
        measured = _ChannelMeans({name: layer})
        try:
            with _output_quantizers_off([layer]):
                _run(quantized_model, batches)
        finally:
            measured.remove()
        quantized_mean, fp32_mean = measured.mean(name), reference.mean(name)
        if quantized_mean is None or quantized_mean.shape != fp32_mean.shape:
            continue
        errors[name] = quantized_mean - fp32_mean
        if apply:
            _remove_from_bias(layer, errors[name].to(torch.float32))
    return errors


def _remove_from_bias(layer: QuantizedLayer, shift: torch.Tensor) -> None:
    with torch.no_grad():
        module = layer.layer
        if module.bias is None:
            module.bias = nn.Parameter(-shift)
        else:
            writable(module, "bias").sub_(shift)
    round_bias(layer)


def _correctable_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {
        name: layer
        for name, layer in iter_quantized_layers(model)
        if not isinstance(layer, QuantizedEmbedding) and layer.weight_quantizer.enabled
    }


def _fp32_counterparts(
    fp32_model: nn.Module, layers: dict[str, QuantizedLayer]
) -> dict[str, nn.Module]:
    found = {}
    for name in layers:
        module = find_submodule(fp32_model, name)
        if module is not None:
            found[name] = module
    return found


class _output_quantizers_off:
    """Within the block, the given layers' own output quantizers pass values through."""

    def __init__(self, layers) -> None:
        self.quantizers = [
            layer.output_quantizer for layer in layers if layer.output_quantizer is not None
        ]
        self.modes: list[str] = []

    def __enter__(self) -> None:
        self.modes = [quantizer.mode for quantizer in self.quantizers]
        for quantizer in self.quantizers:
            quantizer.mode = OFF

    def __exit__(self, *exc) -> None:
        for quantizer, mode in zip(self.quantizers, self.modes, strict=True):
            quantizer.mode = mode


# analytic (data-free) ----------------------------------------------------------------------------
def expected_clipped_relu(
    mean: torch.Tensor, std: torch.Tensor, upper: torch.Tensor | float | None
) -> torch.Tensor:
    """``E[min(max(y, 0), upper)]`` per channel for ``y ~ N(mean, std^2)`` (``upper`` None:
    no upper bound, a plain ReLU)."""
    mean, std = mean.to(torch.float64), std.to(torch.float64).clamp_min(1e-12)

    def relu_mean(mu: torch.Tensor) -> torch.Tensor:
        z = mu / std
        density = torch.exp(-0.5 * z * z) / (2.0 * torch.pi) ** 0.5
        return std * density + mu * torch.special.ndtr(z)

    expected = relu_mean(mean)
    if upper is not None:
        expected = expected - relu_mean(mean - torch.as_tensor(upper, dtype=torch.float64))
    return expected


def _clamp_bound(node: FlowNode) -> tuple[bool, torch.Tensor | float | None]:
    """``(clamps from 0 or is a per-channel minimum, its upper bound or None)``: ReLU, ReLU6,
    a Hardtanh from 0 and the parts of an equalized ReLU6."""
    if node.kind == "function":
        return node.name in ("relu", "relu_"), None
    module = node.module
    if isinstance(module, ChannelMinimum):
        return True, module.upper
    if isinstance(module, nn.Hardtanh) and float(module.min_val) == 0.0:
        return True, float(module.max_val)
    return type(module) is nn.ReLU, None


def expected_inputs(
    fp32_model: nn.Module, plans: list[LayerPlan], batch: Any
) -> dict[str, torch.Tensor]:
    """``E[x]`` per input channel of every layer whose input is ``act(y)`` (or ``y``) of a
    layer carrying output statistics, from one traced forward pass of ``fp32_model``."""
    statistics = {plan.name: plan for plan in plans if plan.output_mean is not None}
    flow = trace_data_flow(fp32_model, first_samples(batch))
    producer = flow.producer()

    def once(node: FlowNode | None) -> bool:
        return node is not None and node.kind == "module" and flow.calls.get(node.name) == 1

    expected: dict[str, torch.Tensor] = {}
    for node in flow.nodes:
        if not once(node) or not isinstance(node.module, (nn.Linear, *CONV_TYPES)):
            continue
        source = producer.get(node.inputs[0]) if node.inputs else None
        upper, clipped = None, False
        while source is not None and source.name not in statistics:  # ReLU, then a bound
            clamps, bound = _clamp_bound(source)
            if not clamps or not source.inputs:
                source = None
                break
            if bound is not None:
                upper = (
                    bound
                    if upper is None
                    else torch.minimum(torch.as_tensor(upper), torch.as_tensor(bound))
                )
            clipped = True
            source = producer.get(source.inputs[0])
        if not once(source) or source.name not in statistics:
            continue
        if isinstance(source.module, nn.Linear) != isinstance(node.module, nn.Linear):
            continue  # a conv's channels are not a Linear's features
        plan = statistics[source.name]
        if clipped:
            means = expected_clipped_relu(plan.output_mean, plan.output_std, upper)
        else:
            means = plan.output_mean.to(torch.float64)
        if means.numel() == node.module.weight.shape[1] * getattr(node.module, "groups", 1):
            expected[node.name] = means
    return expected


def weight_error_shift(layer: QuantizedLayer, input_means: torch.Tensor) -> torch.Tensor:
    """``(W_q - W) E[x]`` per output channel: the mean output error the weights' rounding
    adds when input channel ``i`` has mean ``E[x_i]`` (a conv's padding ignored)."""
    error = (layer.quantized_weight().detach() - layer.weight.detach()).to(torch.float64)
    error = error.reshape(error.shape[0], error.shape[1], -1).sum(dim=2)  # [out, in / groups]
    groups = getattr(layer.layer, "groups", 1)
    per_group = input_means.reshape(groups, -1).repeat_interleave(error.shape[0] // groups, 0)
    return (error * per_group).sum(dim=1)


def correct_biases_analytically(
    fp32_model: nn.Module, quantized_model: nn.Module, plans: list[LayerPlan], batch: Any
) -> list[str]:
    """Analytic bias correction of ``quantized_model`` in place: ``b -= (W_q - W) E[x]`` for
    every quantized layer whose ``E[x]`` follows from a folded BatchNorm; returns those
    layers. ``batch`` only traces the data flow."""
    layers = _correctable_layers(quantized_model)
    corrected = []
    for name, means in expected_inputs(fp32_model, plans, batch).items():
        if name in layers:
            _remove_from_bias(layers[name], weight_error_shift(layers[name], means).float())
            corrected.append(name)
    return corrected
