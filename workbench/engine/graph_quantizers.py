"""Activation quantizers placed from the data flow, so that the simulated model computes what
an INT8 runtime computes.

Module swapping quantizes the *inputs* of Linear / Conv layers. That is all a Linear needs
(ONNX Runtime runs DQ -> MatMul as MatMulIntegerToFloat, FP32 out), but a convolution runs as
an integer kernel only as DQ -> Conv -> Q (QLinearConv: uint8 in, uint8 out), and a residual
add only as DQ, DQ -> Add -> Q (QLinearAdd). So, when activations are quantized:

* every quantized conv's output is quantized. The quantizer goes after the ReLU module that
  alone consumes the conv (Conv -> ReLU -> Q: the ReLU vanishes into the kernel, since a range
  starting at 0 has zero point 0), else into the folded BatchNorm's slot (an ``nn.Identity``
  after folding), else around the conv itself;
* a ReLU module fed by an addition quantizes its output: the residual stream of a ResNet
  stays on the uint8 grid, so Add -> ReLU -> Q becomes QLinearAdd (a ReLU between Linear
  layers is left alone: DQ -> MatMul needs no producer-side Q, and keeping a Linear FP32 then
  really gives it FP32 input);
* a quantized layer whose input comes off such a quantizer (directly, or through max pooling /
  flatten / reshape, which keep values on the grid) takes over its scale and zero point after
  calibration: its own quantizer becomes an exact no-op and the exported graph needs no
  requantization;
* the bias of a quantized conv / linear is rounded to the INT32 grid of ``s_input * s_weight``,
  as QLinearConv and QGemm store it.

Each placed quantizer lives in an :class:`OutputQuantized` wrapper that replaces the module at
its own name, so every other module keeps its name and type.

The data flow comes from one real forward pass: forward hooks on the leaf modules plus a
``TorchFunctionMode`` that sees every tensor op outside them (``out + identity``,
``torch.flatten``). Tensors are keyed by identity *and* version, so an in-place
``out += identity`` is a new value, not the conv's output.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from workbench.engine.batches import run_model
from workbench.engine.bn_fold import set_submodule
from workbench.engine.config import QuantConfig
from workbench.engine.layers import QuantizedLayer, iter_quantized_layers
from workbench.engine.quantizers import OBSERVE, ActivationQuantizer

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
RELU_TYPES = (nn.ReLU, nn.ReLU6)
# ops that only move or select values, so a tensor on a quantization grid stays on it
GRID_PRESERVING_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
)
GRID_PRESERVING_FUNCTIONS = {
    "flatten",
    "reshape",
    "view",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "_max_pool1d",
    "_max_pool2d",
    "_max_pool3d",
    "dropout",
    "clone",
}
ADD_FUNCTIONS = {"add", "add_", "__add__", "__radd__", "__iadd__"}


class OutputQuantized(nn.Module):
    """``output_quantizer(module(...))``: a module whose output is quantized where it is made."""

    def __init__(self, module: nn.Module, output_quantizer: ActivationQuantizer) -> None:
        super().__init__()
        self.module = module
        self.output_quantizer = output_quantizer
        self.observed_calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        if getattr(self.output_quantizer, "mode", None) == OBSERVE:
            self.observed_calls += 1
        return self.output_quantizer(out)

    def extra_repr(self) -> str:
        return "output quantized"


# data flow -----------------------------------------------------------------------------------
Key = tuple[int, int]


@dataclass
class FlowNode:
    """One module call (a leaf module) or one tensor op outside leaf modules."""

    kind: str  # "module" or "function"
    name: str  # module name or op name
    module: nn.Module | None
    inputs: list[Key]
    outputs: list[Key]


@dataclass
class DataFlow:
    nodes: list[FlowNode] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    keep_alive: list[torch.Tensor] = field(default_factory=list)

    def producer(self) -> dict[Key, FlowNode]:
        made: dict[Key, FlowNode] = {}
        for node in self.nodes:
            for key in node.outputs:
                made.setdefault(key, node)
        return made

    def consumers(self) -> dict[Key, list[FlowNode]]:
        used: dict[Key, list[FlowNode]] = {}
        for node in self.nodes:
            for key in dict.fromkeys(node.inputs):
                used.setdefault(key, []).append(node)
        return used


def _key(tensor: torch.Tensor) -> Key:
    return (id(tensor), tensor._version)


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _is_leaf(module: nn.Module) -> bool:
    return isinstance(module, QuantizedLayer | OutputQuantized) or not any(
        True for _ in module.children()
    )


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, flow: DataFlow, depth: list[int]) -> None:
        super().__init__()
        self.flow = flow
        self.depth = depth

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth[0] > 0 or getattr(func, "__name__", "") == "__get__":
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        in_keys = [_key(t) for t in inputs]
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        out_keys = [_key(t) for t in outputs]
        if outputs and not set(out_keys) <= set(in_keys):
            self.flow.nodes.append(
                FlowNode("function", getattr(func, "__name__", str(func)), None, in_keys, out_keys)
            )
            self.flow.keep_alive.extend(inputs + outputs)
        return out


def _few_samples(batch: Any, count: int = 2) -> Any:
    """The first ``count`` samples of a batch: the data flow does not depend on the batch
    size, and tracing keeps every intermediate tensor alive."""
    if isinstance(batch, torch.Tensor):
        return batch[:count] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return {k: _few_samples(v, count) for k, v in batch.items()}
    if isinstance(batch, list | tuple) and batch:
        return [_few_samples(batch[0], count), *batch[1:]]
    return batch


def trace_data_flow(model: nn.Module, batch: Any) -> DataFlow:
    """Run ``batch`` through ``model`` once and record which call consumed which tensor."""
    flow = DataFlow()
    depth = [0]
    pending: dict[int, list] = {}
    names = {module: name for name, module in model.named_modules()}
    handles = []

    def pre_hook(module, args, kwargs):
        if depth[0] == 0:
            inputs = _tensors((args, kwargs))
            pending.setdefault(id(module), []).append(([_key(t) for t in inputs], inputs))
        depth[0] += 1

    def post_hook(module, args, kwargs, output):
        depth[0] -= 1
        if depth[0] == 0:
            name = names.get(module, "")
            flow.calls[name] = flow.calls.get(name, 0) + 1
            in_keys, inputs = pending[id(module)].pop()
            outputs = _tensors(output)
            out_keys = [_key(t) for t in outputs]
            if not set(out_keys) <= set(in_keys):  # nn.Identity & co. are transparent
                flow.nodes.append(FlowNode("module", name, module, in_keys, out_keys))
            flow.keep_alive.extend(inputs + outputs)

    for module in model.modules():
        if _is_leaf(module):
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    try:
        with torch.no_grad(), _FunctionRecorder(flow, depth):
            run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return flow


def _grid_preserving(node: FlowNode) -> bool:
    if node.kind == "module":
        return isinstance(node.module, GRID_PRESERVING_MODULES)
    return node.name in GRID_PRESERVING_FUNCTIONS


# placement -----------------------------------------------------------------------------------
@dataclass
class Placement:
    """Where output quantizers go (module names) and which layer inputs share them."""

    wrap: list[str] = field(default_factory=list)
    inner: list[str] = field(default_factory=list)  # quantized layers holding it themselves
    share: dict[str, str] = field(default_factory=dict)  # layer name -> wrapped module name


def plan_output_quantizers(
    model: nn.Module, flow: DataFlow, folded_bn: dict[str, str] | None = None
) -> Placement:
    """Decide which modules get an output quantizer and which layer inputs then share it."""
    bn_slot = {conv: bn for bn, conv in (folded_bn or {}).items()}
    producer, consumers = flow.producer(), flow.consumers()
    sites: dict[Key, str] = {}
    placement = Placement()

    def once(node: FlowNode) -> bool:
        return flow.calls.get(node.name, 0) == 1

    def add_site(name: str, key: Key, inner: bool = False) -> None:
        names = placement.inner if inner else placement.wrap
        if name not in names:
            names.append(name)
        sites[key] = name

    quantized_relus: set[str] = set()
    for node in flow.nodes:
        layer = node.module
        if not isinstance(layer, QuantizedLayer) or layer.input_quantizer is None:
            continue
        if not isinstance(layer.layer, CONV_TYPES) or not once(node) or not node.outputs:
            continue
        out = node.outputs[0]
        users = consumers.get(out, [])
        slot = bn_slot.get(layer.layer_name)
        if (
            len(users) == 1
            and isinstance(users[0].module, RELU_TYPES)
            and once(users[0])
            and users[0].inputs[0] == out
        ):
            add_site(users[0].name, users[0].outputs[0])
            quantized_relus.add(users[0].name)
        elif (
            slot is not None
            and isinstance(_get(model, slot), nn.Identity)
            and flow.calls.get(slot, 0) == 1
        ):
            add_site(slot, out)
        else:
            add_site(node.name, out, inner=True)

    for node in flow.nodes:
        if not isinstance(node.module, RELU_TYPES) or node.name in quantized_relus:
            continue
        if not once(node) or not node.inputs or not node.outputs:
            continue
        source = producer.get(node.inputs[0])
        fed_by_add = (
            source is not None and source.kind == "function" and (source.name in ADD_FUNCTIONS)
        )
        if fed_by_add:
            add_site(node.name, node.outputs[0])

    for node in flow.nodes:
        layer = node.module
        if not isinstance(layer, QuantizedLayer) or layer.input_quantizer is None:
            continue
        key = node.inputs[0] if node.inputs else None
        while key is not None and key not in sites:
            source = producer.get(key)
            passes = source is not None and _grid_preserving(source) and source.inputs
            key = source.inputs[0] if passes else None
        if key is not None and sites[key] != node.name:
            placement.share[layer.layer_name] = sites[key]
    return placement


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# entry points --------------------------------------------------------------------------------
def insert_output_quantizers(
    model: nn.Module, batch: Any, config: QuantConfig, folded_bn: dict[str, str] | None = None
) -> None:
    """Place output quantizers in ``model`` (in place; see the module docstring)."""
    if config.activation is None:
        return
    has_conv = any(isinstance(layer.layer, CONV_TYPES) for _, layer in iter_quantized_layers(model))
    has_relu = any(isinstance(module, RELU_TYPES) for module in model.modules())
    if not has_conv and not has_relu:
        return
    try:
        flow = trace_data_flow(model, _few_samples(batch))
    except Exception as exc:  # the model ran in BN folding; a failure here only costs speed
        warnings.warn(
            f"could not trace the model's data flow ({type(exc).__name__}: {exc}); conv outputs "
            "stay unquantized and ONNX Runtime will not fuse those convs",
            stacklevel=2,
        )
        return
    placement = plan_output_quantizers(model, flow, folded_bn)

    def new_quantizer(name: str) -> ActivationQuantizer:
        return ActivationQuantizer(
            config.activation, config.observer, f"output of {name}", config.percentile
        )

    placed: set[str] = set()
    for name in placement.wrap:
        target = _get(model, name) if name else None
        if target is not None:
            set_submodule(model, name, OutputQuantized(target, new_quantizer(name)))
            placed.add(name)
    for name in placement.inner:
        layer = model if not name else _get(model, name)
        if isinstance(layer, QuantizedLayer):
            layer.output_quantizer = new_quantizer(layer.layer_name)
            placed.add(name)
    for layer_name, site in placement.share.items():
        if site not in placed:
            continue
        for name, layer in iter_quantized_layers(model):
            if name == layer_name:
                path = f"{site}.output_quantizer" if site else "output_quantizer"
                layer.input_quantizer.shares_scale_of = path


def round_bias(layer: QuantizedLayer) -> None:
    """Round a quantized layer's bias to the INT32 grid of ``s_input * s_weight`` (in place)."""
    bias = layer.layer.bias
    if bias is None or layer.input_quantizer is None:
        return
    with torch.no_grad():
        scale = bias_scale_of(layer)
        bias.copy_(torch.round(bias / scale).clamp(-(2**31), 2**31 - 1) * scale)


def bias_scale_of(layer: QuantizedLayer) -> torch.Tensor:
    """``s_input * s_weight`` (one per output channel when the weight is per-channel)."""
    input_scale = layer.input_quantizer.scale.detach().abs().reshape(())
    weight_scale, _ = layer.weight_quantizer.qparams(layer.layer.weight)
    weight_scale = weight_scale.detach().abs().reshape(-1)
    scale = (input_scale * weight_scale).to(torch.float32)
    out_channels = layer.layer.weight.shape[0]
    return scale.expand(out_channels).contiguous() if scale.numel() == 1 else scale


def finish_output_quantizers(model: nn.Module) -> None:
    """After calibration: fix the output quantizers' qparams (unwrapping those that never saw
    data), give sharing layer inputs the same scale / zero point, and round biases."""
    for name, module in list(model.named_modules()):
        if isinstance(module, OutputQuantized) and not module.output_quantizer.calibrated:
            if module.observed_calls == 0 and name:
                set_submodule(model, name, module.module)
            else:
                module.output_quantizer.calibrate()
    for _, layer in iter_quantized_layers(model):
        if layer.output_quantizer is not None and not layer.output_quantizer.calibrated:
            layer.output_quantizer.calibrate()
    for _, layer in iter_quantized_layers(model):
        quantizer = layer.input_quantizer
        source_name = getattr(quantizer, "shares_scale_of", None)
        source = _get(model, source_name) if source_name else None
        if isinstance(source, ActivationQuantizer) and source.calibrated:
            with torch.no_grad():
                quantizer.scale.copy_(source.scale.reshape(quantizer.scale.shape))
                quantizer.zero_point.copy_(source.zero_point.reshape(quantizer.zero_point.shape))
        round_bias(layer)
