"""Cross-layer equalization (CLE) and high-bias absorption (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction").

For a pair ``A -> act -> B`` where ``act`` is ReLU, ReLU6 or nothing, scaling output channel
``i`` of ``A`` by ``1 / s_i`` and input channel ``i`` of ``B`` by ``s_i`` leaves the function
unchanged (ReLU is positively homogeneous). With ``r1_i`` the range of ``A``'s channel and
``r2_i`` that of ``B``'s input channel,

    s_i = sqrt(r1_i * r2_i) / r2_i

gives both the same range ``sqrt(r1_i r2_i)``, so a per-tensor weight scale wastes less of its
grid on a few wide channels. A layer in the middle of a chain belongs to two pairs, so the
pairs are equalized again and again until the scales stop changing.

ReLU6 is not positively homogeneous: its clip at 6 becomes a clip at ``6 / s_i`` per channel,
so an equalized ReLU6 is replaced by :class:`ChannelClippedReLU` (a clip at the largest bound,
then a per-channel minimum), which computes exactly what ReLU6 did on the unscaled values and
lets the conv before it still run as QLinearConv.

High-bias absorption (ReLU and ReLU6 pairs): where channel ``i`` of ``A``'s output never falls below
``c_i > 0`` on the calibration batch, ``relu(y - c) + c = relu(y)`` there, so ``c`` moves from
``A``'s bias into ``B``'s bias (``b_B += W_B c``), which narrows the activation range ``B``'s
input quantizer must cover (for ReLU6, its per-channel bound moves down by ``c`` too). It is
exact on that batch, approximate below it; ``B`` must not pad its input (the padding zeros
would then stand for ``c``).

Pairs come from the data flow of one forward pass (``trace_data_flow``): ``A``'s output must
feed only the activation, the activation's output only ``B``, each called once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.engine.calibration.batches import first_samples, run_model
from workbench.engine.capture.modules import get_layer, set_submodule, writable
from workbench.engine.placement.data_flow import FlowNode, trace_data_flow

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
EQUALIZABLE_TYPES = (*CONV_TYPES, nn.Linear)
RELU_FUNCTIONS = {"relu", "relu_"}
MAX_ITERATIONS = 100
CONVERGED_LOG_SCALE = 1e-6  # |log s_i| below this for every channel: converged
RANGE_FLOOR = 1e-12


class ChannelMinimum(nn.Module):
    """``min(x, upper_c)`` with one bound per channel (exports as ``Min`` with a constant)."""

    def __init__(self, upper: torch.Tensor, channel_axis: int) -> None:
        super().__init__()
        self.register_buffer("upper", upper.detach().clone().to(torch.float32))
        self.channel_axis = channel_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_axis % x.dim()] = -1
        return torch.minimum(x, self.upper.reshape(shape))

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}"


class ChannelClippedReLU(nn.Module):
    """``min(relu(x), upper_c)`` with one upper bound per channel: an equalized ReLU6.

    Computed as ``clip(x, 0, max_c upper_c)`` (an ``nn.Hardtanh`` from 0: quantizer placement
    sees a ReLU-like op after the conv, the output quantizer goes after it and ONNX Runtime
    drops the exported ``Clip`` into QLinearConv) followed by the per-channel
    :class:`ChannelMinimum`, which runs on its own between the conv's quantized output and the
    next layer's input quantizer. Equal to ``min(relu(x), upper_c)`` for every ``x``.
    """

    def __init__(self, upper: torch.Tensor, channel_axis: int) -> None:
        super().__init__()
        self.clip = nn.Hardtanh(0.0, float(upper.max()))
        self.bound = ChannelMinimum(upper, channel_axis)

    @property
    def upper(self) -> torch.Tensor:
        return self.bound.upper

    def lower_bounds(self, shift: torch.Tensor) -> None:
        """``upper_c -= shift_c`` (high-bias absorption moved ``shift`` out of the input)."""
        self.bound.upper.sub_(shift)
        self.clip.max_val = float(self.bound.upper.max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bound(self.clip(x))


@dataclass
class EqualizedPair:
    """``first -> activation -> second``; ``activation`` is a module name, a function name
    (``relu``), or ``None`` (the output of ``first`` feeds ``second`` directly)."""

    first: str
    second: str
    activation: str | None
    activation_kind: str  # "relu", "relu6" or "identity"
    absorbed_bias: bool = False
    # what happened to ``first``'s output channel i: divided by scale_i, then shift_i
    # subtracted (high-bias absorption); None until equalized / when nothing was absorbed
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None


def _kind_of_activation(node: FlowNode) -> str | None:
    if node.kind == "module":
        if type(node.module) is nn.ReLU:
            return "relu"
        if type(node.module) is nn.ReLU6:
            return "relu6"
        return None
    return "relu" if node.name in RELU_FUNCTIONS else None


def _channels_match(first: nn.Module, second: nn.Module) -> bool:
    """Whether ``first``'s output channels are ``second``'s input channels, one to one."""
    if not isinstance(first, EQUALIZABLE_TYPES) or not isinstance(second, EQUALIZABLE_TYPES):
        return False
    if isinstance(first, nn.Linear) != isinstance(second, nn.Linear):
        return False
    if isinstance(first, CONV_TYPES):
        if type(first) is not type(second) or not _group_supported(first):
            return False
        if not _group_supported(second):
            return False
        return first.out_channels == second.in_channels
    return first.out_features == second.in_features


def _group_supported(conv: nn.Module) -> bool:
    """Plain convs and depthwise convs (one input channel per output channel) only."""
    return conv.groups == 1 or (conv.groups == conv.in_channels == conv.out_channels)


def find_equalization_pairs(model: nn.Module, batch: Any) -> list[EqualizedPair]:
    """The ``A -> ReLU / ReLU6 / nothing -> B`` pairs of ``model`` (from its data flow)."""
    flow = trace_data_flow(model, first_samples(batch))
    consumers = flow.consumers()

    def once(node: FlowNode) -> bool:
        return node.kind == "function" or flow.calls.get(node.name, 0) == 1

    def sole_user(node: FlowNode) -> FlowNode | None:
        if len(node.outputs) != 1:
            return None
        users = consumers.get(node.outputs[0], [])
        if len(users) != 1 or not once(users[0]) or not users[0].inputs:
            return None
        return users[0] if users[0].inputs[0] == node.outputs[0] else None

    pairs: list[EqualizedPair] = []
    for node in flow.nodes:
        if node.kind != "module" or not isinstance(node.module, EQUALIZABLE_TYPES):
            continue
        if not once(node):
            continue
        user = sole_user(node)
        if user is None:
            continue
        activation, kind = None, "identity"
        if not isinstance(user.module, EQUALIZABLE_TYPES):
            kind = _kind_of_activation(user)
            if kind is None:
                continue
            activation = user.name
            user = sole_user(user)
            if user is None:
                continue
        if user.kind != "module" or not once(user):
            continue
        if not _channels_match(node.module, user.module):
            continue
        pairs.append(EqualizedPair(node.name, user.name, activation, kind))
    return pairs


def _output_ranges(layer: nn.Module) -> torch.Tensor:
    """max |W| per output channel of ``layer``."""
    return layer.weight.detach().abs().reshape(layer.weight.shape[0], -1).amax(dim=1)


def _input_ranges(layer: nn.Module) -> torch.Tensor:
    """max |W| per input channel of ``layer`` (per channel for a depthwise conv)."""
    weight = layer.weight.detach().abs()
    if isinstance(layer, CONV_TYPES) and layer.groups > 1:
        return weight.reshape(weight.shape[0], -1).amax(dim=1)
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1)


def _scale_input_channels(layer: nn.Module, scale: torch.Tensor) -> None:
    shape = [1] * layer.weight.dim()
    if isinstance(layer, CONV_TYPES) and layer.groups > 1:
        shape[0] = -1
    else:
        shape[1] = -1
    writable(layer, "weight").mul_(scale.reshape(shape))


def _scale_output_channels(layer: nn.Module, scale: torch.Tensor) -> None:
    """Divide output channel ``i`` of ``layer`` (weight and bias) by ``scale_i``."""
    shape = [-1] + [1] * (layer.weight.dim() - 1)
    writable(layer, "weight").div_(scale.reshape(shape))
    if layer.bias is not None:
        writable(layer, "bias").div_(scale)


def _equalize_once(model: nn.Module, pair: EqualizedPair, clip: dict[str, torch.Tensor]) -> float:
    """Equalize one pair; returns max |log s_i| (0 when already equal)."""
    first, second = get_layer(model, pair.first), get_layer(model, pair.second)
    r1, r2 = _output_ranges(first), _input_ranges(second)
    usable = (r1 > RANGE_FLOOR) & (r2 > RANGE_FLOOR)
    scale = torch.where(
        usable, torch.sqrt(r1 * r2) / r2.clamp_min(RANGE_FLOOR), torch.ones_like(r1)
    )
    _scale_output_channels(first, scale)
    _scale_input_channels(second, scale)
    pair.scale = scale if pair.scale is None else pair.scale * scale
    if pair.activation_kind == "relu6":
        clip[pair.activation] = clip[pair.activation] / scale
    return float(scale.log().abs().max()) if scale.numel() else 0.0


def _channel_minimum(model: nn.Module, name: str, batch: Any) -> torch.Tensor | None:
    """The smallest value of each output channel of layer ``name`` on ``batch``."""
    layer = get_layer(model, name)
    found: list[torch.Tensor] = []

    def hook(module, inputs, output):
        axis = 1 if isinstance(module, CONV_TYPES) else -1
        moved = output.detach().movedim(axis, 0)
        found.append(moved.reshape(moved.shape[0], -1).amin(dim=1))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            run_model(model, batch)
    finally:
        handle.remove()
    return found[0] if len(found) == 1 else None


def _absorb_high_bias(model: nn.Module, pair: EqualizedPair, batch: Any) -> bool:
    """Move what channel ``i`` of ``first``'s output always has (``c_i = min > 0``) into
    ``second``'s bias. Returns whether anything moved."""
    first, second = get_layer(model, pair.first), get_layer(model, pair.second)
    if first.bias is None or _has_padding(second):
        # zero padding of B's input would stand for the shifted value: not exact at the border
        return False
    low = _channel_minimum(model, pair.first, batch)
    if low is None:
        return False
    shift = low.clamp_min(0.0)
    if not bool((shift > 0).any()):
        return False
    # what B adds for a constant input c per channel: W_B summed over everything but the
    # output channel (and, for a depthwise conv, c_i times its own kernel)
    weight = second.weight.detach()
    if isinstance(second, CONV_TYPES) and second.groups > 1:
        added = weight.reshape(weight.shape[0], -1).sum(dim=1) * shift
    else:
        added = (weight * _along(shift, weight, 1)).reshape(weight.shape[0], -1).sum(dim=1)
    writable(first, "bias").sub_(shift)
    pair.shift = shift
    if pair.activation_kind == "relu6":  # min(relu(y - c), u - c) = min(relu(y), u) - c, y >= c
        get_layer(model, pair.activation).lower_bounds(shift)
    if second.bias is None:
        second.bias = nn.Parameter(added.clone())
    else:
        writable(second, "bias").add_(added)
    return True


def _along(values: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[axis] = -1
    return values.reshape(shape)


def _has_padding(layer: nn.Module) -> bool:
    if not isinstance(layer, CONV_TYPES):
        return False
    padding = layer.padding
    if isinstance(padding, str):
        return padding != "valid"
    return any(p != 0 for p in padding)


def equalize_model(model: nn.Module, batch: Any, absorb_bias: bool = True) -> list[EqualizedPair]:
    """Cross-layer equalization of ``model`` in place (eval mode, BatchNorm already folded).

    Returns the pairs equalized. ``batch`` is traced for the pairs and, when ``absorb_bias``,
    measured for high-bias absorption.
    """
    pairs = find_equalization_pairs(model, batch)
    if not pairs:
        return []
    clip = {
        pair.activation: torch.full((get_layer(model, pair.first).weight.shape[0],), 6.0)
        for pair in pairs
        if pair.activation_kind == "relu6"
    }
    with torch.no_grad():
        for _ in range(MAX_ITERATIONS):
            change = max(_equalize_once(model, pair, clip) for pair in pairs)
            if change < CONVERGED_LOG_SCALE:
                break
        for pair in pairs:
            if pair.activation_kind == "relu6":
                axis = 1 if isinstance(get_layer(model, pair.first), CONV_TYPES) else -1
                set_submodule(
                    model, pair.activation, ChannelClippedReLU(clip[pair.activation], axis)
                )
        if absorb_bias:
            for pair in pairs:
                if pair.activation_kind in ("relu", "relu6"):
                    pair.absorbed_bias = _absorb_high_bias(model, pair, batch)
    return pairs


def mark_equalized(plans: list, pairs: list[EqualizedPair]) -> None:
    """Set ``equalized`` on the plans of the layers in ``pairs``; the expected output
    statistics a ``first`` layer's plan carries (``output_mean`` / ``output_std``) follow its
    rescaled and shifted output."""
    names = {pair.first for pair in pairs} | {pair.second for pair in pairs}
    firsts = {pair.first: pair for pair in pairs}
    for plan in plans:
        if plan.name in names:
            plan.equalized = True
        pair = firsts.get(plan.name)
        if pair is None or plan.output_mean is None or pair.scale is None:
            continue
        plan.output_mean = plan.output_mean / pair.scale
        plan.output_std = plan.output_std / pair.scale
        if pair.shift is not None:
            plan.output_mean = plan.output_mean - pair.shift
