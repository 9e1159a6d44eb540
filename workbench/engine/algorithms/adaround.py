"""AdaRound: learned rounding of weights, layer by layer (Nagel et al. 2020, "Up or Down?
Adaptive Rounding for Post-Training Quantization").

Rounding each weight to its nearest grid point is not what minimises the layer's output
error. AdaRound keeps the scale and learns, per weight, whether to round down or up:

    W~ = s * (clamp(floor(W / s) + h(V) + z, q_min, q_max) - z)
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)          (rectified sigmoid)
    loss = sum_c (W~ x_q - W x)^2  +  lambda * sum (1 - |2 h(V) - 1|^beta)

``x_q`` is the layer's (quantized) input in the quantized model, with the layers before it
already rounded; ``W x`` its FP32 output in the FP32 model. ``beta`` is annealed from 20 to 2
after a warm-up without the regulariser, which pushes every ``h`` to 0 or 1. At the end each
weight is rounded up where ``h >= 0.5``: its code is the floor or the ceiling of ``W / s``
(plus the zero point), never further. The learned codes are kept in an
:class:`AdaRoundWeightQuantizer`; the simulation and the ONNX export both read them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.core.qtensor import broadcast_qparam
from workbench.engine.calibration.batches import run_model
from workbench.engine.capture.modules import find_submodule, hooks_removed
from workbench.engine.placement.layers import (
    QuantizedEmbedding,
    QuantizedLayer,
    iter_quantized_layers,
    quantized_layer_calls,
    smoothed_input,
)
from workbench.engine.quantizers.modules import WeightQuantizer

ZETA, GAMMA = 1.1, -0.1
REGULARIZATION = 0.01  # lambda
BETA_START, BETA_END = 20.0, 2.0
WARMUP_FRACTION = 0.2  # iterations without the rounding regulariser
LEARNING_RATE = 1e-2
SAMPLES_PER_STEP = 32


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _grid(weight: torch.Tensor, quantizer: WeightQuantizer) -> tuple[torch.Tensor, ...]:
    """``W / s``, the scale and the zero point shaped to broadcast against ``weight``."""
    scale, zero_point = quantizer.qparams(weight)
    scale, zero_point = scale.detach().to(weight.dtype), zero_point.detach().to(weight.dtype)
    if scale.numel() > 1:
        s = broadcast_qparam(scale, weight, quantizer.scheme)
        z = broadcast_qparam(zero_point, weight, quantizer.scheme)
    else:
        s, z = scale.reshape(()), zero_point.reshape(())
    return weight.detach() / s, s, z


def dequantize_rounded(
    weight: torch.Tensor, quantizer: WeightQuantizer, up: torch.Tensor
) -> torch.Tensor:
    """``s * (clamp(floor(W / s) + up + z, q_min, q_max) - z)``; ``up`` in [0, 1]."""
    scaled, s, z = _grid(weight, quantizer)
    scheme = quantizer.scheme
    codes = torch.clamp(torch.floor(scaled) + up + z, scheme.quant_min, scheme.quant_max)
    return (codes - z) * s


class AdaRoundWeightQuantizer(WeightQuantizer):
    """A frozen weight quantizer whose rounding direction per weight was learned.

    ``round_up`` holds one boolean per weight: the code is ``floor(W / s) + z`` or one more.
    The scale and zero point are those of the quantizer it replaces.
    """

    def __init__(self, base: WeightQuantizer, round_up: torch.Tensor) -> None:
        super().__init__(base.scheme, base.observer_name, base.tensor_name)
        self.scale = base.scale.detach().clone()
        self.zero_point = base.zero_point.detach().clone()
        self.frozen = True
        self.enabled = base.enabled
        self.register_buffer("round_up", round_up.detach().to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return dequantize_rounded(weight, self, self.round_up.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rounding=adaround"


def _layer_output(layer: QuantizedLayer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    module = layer.layer
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


def _capture(
    fp32_model: nn.Module, quantized_model: nn.Module, name: str, batches: Sequence[Any]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's input in the quantized model and its output in the FP32 model, all
    calibration batches concatenated along the first axis."""
    quantized_layer = dict(iter_quantized_layers(quantized_model))[name]
    fp32_layer = find_submodule(fp32_model, name)
    if fp32_layer is None:
        return None
    inputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    handles = [
        quantized_layer.register_forward_hook(
            lambda m, args, out: inputs.append(args[0].detach().clone())
        ),
        fp32_layer.register_forward_hook(lambda m, args, out: targets.append(out.detach().clone())),
    ]
    with hooks_removed(handles), torch.no_grad():
        for index, batch in enumerate(batches):
            run_model(quantized_model, batch, index)
            run_model(fp32_model, batch, index)
    if not inputs or len(inputs) != len(targets) or len(inputs) != len(batches):
        return None  # not called, or called more than once per forward (a shared module)
    x = smoothed_input(quantized_layer.layer, torch.cat([t.detach() for t in inputs]))
    if quantized_layer.input_quantizer is not None:
        with torch.no_grad():
            x = quantized_layer.input_quantizer(x)
    return x, torch.cat(targets)


def learn_rounding(
    layer: QuantizedLayer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    iterations: int,
    seed: int = 0,
) -> torch.Tensor:
    """Learn the rounding of ``layer``'s weight on cached ``inputs`` -> FP32 ``targets``;
    returns ``round_up`` (one boolean per weight)."""
    weight = layer.layer.weight.detach()
    quantizer = layer.weight_quantizer
    scaled, _, _ = _grid(weight, quantizer)
    rest = (scaled - torch.floor(scaled)).clamp(1e-4, 1 - 1e-4)
    # start where h(V) equals the fractional part: the soft weight is the FP32 weight
    v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
    v = nn.Parameter(v.clone())
    optimizer = torch.optim.Adam([v], lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    warmup = int(iterations * WARMUP_FRACTION)
    channel_axis = 1 if not isinstance(layer.layer, nn.Linear) else -1
    for step in range(iterations):
        index = torch.randint(0, inputs.shape[0], (SAMPLES_PER_STEP,), generator=generator)
        soft = dequantize_rounded(weight, quantizer, rectified_sigmoid(v))
        out = _layer_output(layer, inputs[index], soft)
        loss = (out - targets[index]).pow(2).sum(dim=channel_axis).mean()
        if step >= warmup:
            progress = (step - warmup) / max(iterations - warmup, 1)
            beta = BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(progress * math.pi))
            h = rectified_sigmoid(v)
            loss = loss + REGULARIZATION * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (rectified_sigmoid(v.detach()) >= 0.5).detach()


def adaround_model(
    fp32_model: nn.Module,
    quantized_model: nn.Module,
    batches: Sequence[Any],
    iterations: int,
    progress: bool = True,
) -> list[str]:
    """Learn the rounding of every quantized Linear / Conv, in forward order, in place;
    returns the layers rounded."""
    order = list(dict.fromkeys(quantized_layer_calls(quantized_model, batches[0])))
    layers = dict(iter_quantized_layers(quantized_model))
    rounded = []
    for name in tqdm(order, desc="adaround", disable=not progress):
        layer = layers[name]
        if isinstance(layer, QuantizedEmbedding) or not layer.weight_quantizer.enabled:
            continue
        captured = _capture(fp32_model, quantized_model, name, batches)
        if captured is None:
            continue
        round_up = learn_rounding(layer, *captured, iterations=iterations)
        layer.weight_quantizer = AdaRoundWeightQuantizer(layer.weight_quantizer, round_up)
        rounded.append(name)
    return rounded
