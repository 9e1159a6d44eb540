"""Activation quantizers placed from the data flow, per call site, so that the simulated model
computes what an INT8 runtime computes.

Over 400 lines: the data-flow trace, the placement that reads it and the calibration-time steps
of the same placement (scale sharing, bias rounding) change together.

Module swapping quantizes the *inputs* of Linear / Conv layers. That is all a Linear needs
(ONNX Runtime runs DQ -> MatMul as MatMulIntegerToFloat, FP32 out), but a convolution runs as
an integer kernel only as DQ -> Conv -> Q (QLinearConv), a residual add only as
DQ, DQ -> Add -> Q (QLinearAdd), a concat as QLinearConcat, an average pool as
QLinearAveragePool. What each op kind needs is declared once, in ``engine.op_kinds``; this
pass walks the calls of one real forward in order and:

* gives every op of a ``quantized output`` kind an output quantizer (a conv always; an add, a
  concat or an average pool when all its inputs are already on a quantization grid). When a
  ReLU-like op alone consumes it, the quantizer goes after that op instead (ONNX Runtime drops
  the ReLU into the kernel, since the range then starts at zero point 0); a conv without one
  puts it into its folded BatchNorm's slot (an ``nn.Identity``) or holds it itself;
* lets values stay on the grid through ops that only move or select them (max pooling,
  flatten / view / reshape, dropout);
* makes a quantized layer whose input comes off such a grid take over its scale and zero point
  after calibration (its own quantizer is then an exact no-op and the export needs no
  requantization; the input quantizer's ``shares_scale_of`` names the source);
* rounds the bias of a quantized conv / linear to the INT32 grid of ``s_input * s_weight``, as
  QLinearConv and QGemm store it.

Quantizers attach to *call sites* (``engine.call_sites``): a module called once is wrapped in
an :class:`OutputQuantized` at its own name; a parameter-free module called at several sites
(ResNet's shared ``self.relu``) becomes one clone per call; a tensor op (``out += identity``,
``torch.cat``, ``F.relu``) and each call of a layer with weights called at several sites (a
shared conv) get a quantizer in the root's ``quantization_sites``, keyed by call site. Such a
shared layer keeps one input quantizer for all its calls (its observer sees every call): its
INT32 bias is stored on the grid of ``s_input * s_weight``, so one input scale lets the calls
share one weight and one bias in the exported file. The user's model is never touched: all of
this happens in the prepared copy.

The data flow comes from one real forward pass: global module hooks plus a
``TorchFunctionMode`` that sees every tensor op outside leaf modules. Tensors are keyed by
identity *and* version, so an in-place ``out += identity`` is a new value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from workbench.core.scheme import Scheme
from workbench.engine.batches import first_samples, run_model
from workbench.engine.call_sites import (
    CallTracker,
    FunctionSites,
    PerCallSite,
    function_name,
    input_site,
    install_function_sites,
    tracked_calls,
)
from workbench.engine.config import QuantConfig
from workbench.engine.layer_calls import QuantizedLayerCalls, bias_scale_for
from workbench.engine.layers import QuantizedLayer, iter_quantized_layers
from workbench.engine.modules import find_submodule, set_submodule
from workbench.engine.op_kinds import (
    CLAMP,
    CONV,
    FLOAT_FEEDING_GRID,
    KEEPS_GRID,
    LINEAR,
    OTHER,
    QUANTIZED_OUTPUT,
    OpKind,
    function_kind,
    layer_kind,
    module_kind,
)
from workbench.engine.quantizers import OBSERVE, ActivationQuantizer, scale_source

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class OutputQuantized(nn.Module):
    """``output_quantizer(module(...))``: a module whose output is quantized where it is made."""

    quantization_leaf = True

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
    """One call at depth 0: a leaf module call or a tensor op outside leaf modules."""

    kind: str  # "module" or "function"
    name: str  # module name or op name
    module: nn.Module | None
    inputs: list[Key]
    outputs: list[Key]
    site: str = ""  # the call site ("layer1.0.relu#1", "layer1.0.__iadd__#0")
    op: OpKind = OTHER
    reads_parameter: bool = False  # a tensor op with a weight among its inputs (``x @ W``)


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


def _layer_kind(module: nn.Module) -> OpKind:
    if isinstance(module, QuantizedLayer):
        if isinstance(module.layer, CONV_TYPES) and module.input_quantizer is not None:
            return CONV
        return LINEAR if isinstance(module.layer, nn.Linear) else OTHER
    return module_kind(module)


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, flow: DataFlow, tracker: CallTracker) -> None:
        super().__init__()
        self.flow = flow
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = function_name(func)
        site = self.tracker.function_site(name)
        if site is None:
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        in_keys = [_key(t) for t in inputs]
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        out_keys = [_key(t) for t in outputs]
        if outputs and not set(out_keys) <= set(in_keys):
            op = function_kind(name, args, kwargs)
            node = FlowNode("function", name, None, in_keys, out_keys, site, op)
            node.reads_parameter = any(isinstance(t, nn.Parameter) for t in inputs)
            self.flow.nodes.append(node)
            self.flow.keep_alive.extend(inputs + outputs)
        return out


def trace_data_flow(model: nn.Module, batch: Any) -> DataFlow:
    """Run ``batch`` through ``model`` once and record which call consumed which tensor."""
    flow = DataFlow()
    names = {module: name for name, module in model.named_modules() if name}
    tracker = CallTracker(names)
    pending: list = []

    def on_enter(module, site, args):
        if site is not None:
            inputs = _tensors(args)
            pending.append((site, [_key(t) for t in inputs], inputs))

    def on_leave(module, args, output):
        if not pending:
            return
        site, in_keys, inputs = pending.pop()
        name = names[module]
        flow.calls[name] = flow.calls.get(name, 0) + 1
        outputs = _tensors(output)
        out_keys = [_key(t) for t in outputs]
        if not set(out_keys) <= set(in_keys):  # nn.Identity & co. are transparent
            op = _layer_kind(module)
            flow.nodes.append(FlowNode("module", name, module, in_keys, out_keys, site, op))
        flow.keep_alive.extend(inputs + outputs)

    recorder = _FunctionRecorder(flow, tracker)
    with torch.no_grad(), tracked_calls(tracker, on_enter, on_leave), recorder:
        run_model(model, batch)
    return flow


# placement -----------------------------------------------------------------------------------
@dataclass
class Placement:
    """Which call sites get an output quantizer, and which layer inputs then share it.

    ``outputs``: site -> the call whose output is quantized; ``slots``: site -> the folded
    BatchNorm slot that holds a conv's quantizer; ``share``: layer name -> site;
    ``kinds``: site -> the op kind that asked for the quantizer (for the reports);
    ``origins``: site -> the quantized layer whose output it quantizes (its precision);
    ``call_share``: (layer, call n > 0) -> site, for a layer called at several sites."""

    outputs: dict[str, FlowNode] = field(default_factory=dict)
    slots: dict[str, str] = field(default_factory=dict)
    share: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    call_share: dict[tuple[str, int], str] = field(default_factory=dict)  # (layer, call n > 0)


def _can_hold_quantizer(node: FlowNode, calls: dict[str, int]) -> bool:
    """Whether a quantizer can be attached to this call: every call can (``engine.call_sites``:
    a module called once holds it, a parameter-free module called at several sites becomes one
    clone per call, a layer with weights called at several sites and a tensor op get it keyed
    by their call site)."""
    return node.kind == "function" or node.module is not None


def plan_output_quantizers(
    model: nn.Module, flow: DataFlow, folded_bn: dict[str, str] | None = None
) -> Placement:
    """Decide which call sites get an output quantizer (``engine.op_kinds``' table) and which
    layer inputs then share it."""
    bn_slot = {conv: bn for bn, conv in (folded_bn or {}).items()}
    consumers = flow.consumers()
    on_grid: dict[Key, str] = {}  # tensor -> site whose quantizer it comes off
    placement = Placement()
    for node in flow.nodes:
        op = node.op
        if op.output == KEEPS_GRID:
            if node.inputs and node.inputs[0] in on_grid:
                for key in node.outputs:
                    on_grid[key] = on_grid[node.inputs[0]]
            continue
        if op.output == FLOAT_FEEDING_GRID and node.outputs and node.site not in placement.outputs:
            readers = consumers.get(node.outputs[0], [])
            if any(user.op.grid_inputs for user in readers) and _can_hold_quantizer(
                node, flow.calls
            ):
                placement.outputs[node.site] = node
                placement.kinds[node.site] = op.name
                on_grid[node.outputs[0]] = node.site
            continue
        if op.output != QUANTIZED_OUTPUT or not node.outputs or node.site in placement.outputs:
            continue
        if op.tensor_inputs and len(node.inputs) != op.tensor_inputs:
            continue
        if op.grid_inputs and not all(key in on_grid for key in node.inputs):
            continue
        out = node.outputs[0]
        users = consumers.get(out, [])
        target = node
        if (
            len(users) == 1
            and users[0].op.output == CLAMP
            and users[0].inputs[:1] == [out]
            and users[0].outputs
            and _can_hold_quantizer(users[0], flow.calls)
        ):
            target = users[0]
        elif not _can_hold_quantizer(node, flow.calls):
            continue
        placement.outputs[target.site] = target
        placement.kinds[target.site] = op.name
        if isinstance(node.module, QuantizedLayer):
            placement.origins[target.site] = node.module.layer_name
        on_grid[target.outputs[0]] = target.site
        if target is node and op is CONV:
            slot = bn_slot.get(node.module.layer_name)
            if (
                slot is not None
                and isinstance(find_submodule(model, slot), nn.Identity)
                and flow.calls.get(slot, 0) == 1
            ):
                placement.slots[target.site] = slot

    for node in flow.nodes:
        layer = node.module
        if not isinstance(layer, QuantizedLayer) or layer.input_quantizer is None:
            continue
        if not node.inputs:
            continue
        site = on_grid.get(node.inputs[0])
        if site is None or site == node.site:
            continue
        call = int(node.site.rsplit("#", 1)[1]) if flow.calls.get(node.name, 0) > 1 else 0
        if call == 0:
            placement.share[layer.layer_name] = site
        else:  # a later call of a layer called at several sites: its own input quantizer
            placement.call_share[(layer.layer_name, call)] = site
    return placement


def _called_with_weights_at_sites(node: FlowNode, calls: dict[str, int]) -> bool:
    """A module with parameters (a shared conv) called at several sites: one clone per call
    would duplicate its weight, so its output quantizers are keyed by call site instead."""
    if node.module is None or calls.get(node.name, 0) < 2:
        return False
    return any(True for _ in node.module.parameters())


# entry points --------------------------------------------------------------------------------
def insert_output_quantizers(
    model: nn.Module,
    batch: Any,
    config: QuantConfig,
    folded_bn: dict[str, str] | None = None,
    site_names: list[str] | None = None,
) -> dict[str, str]:
    """Place output quantizers in ``model`` (in place; see the module docstring). Returns the
    layers whose input quantizer took a higher precision than their own, each with the layer
    whose precision won (one quantizer feeds both). ``site_names`` receives the name of every
    site considered, also those kept FP32 (what ``overrides`` patterns may name)."""
    site_names = site_names if site_names is not None else []
    if isinstance(model, QuantizedLayer):
        return {}
    if not any(layer.input_quantizer is not None for _, layer in iter_quantized_layers(model)):
        return {}  # weight-only
    try:
        flow = trace_data_flow(model, first_samples(batch))
    except Exception as exc:  # the model ran in BN folding; a failure here only costs speed
        warnings.warn(
            f"could not trace the model's data flow ({type(exc).__name__}: {exc}); conv outputs "
            "stay unquantized and ONNX Runtime will not fuse those convs",
            stacklevel=2,
        )
        return {}
    split_layer_calls(model, flow, config)
    mark_model_inputs(flow)
    if config.quantize_attention_matmuls:
        insert_matmul_input_quantizers(model, flow, config, site_names)
    placement = plan_output_quantizers(model, flow, folded_bn)
    site_names.extend(placement.outputs)
    if not placement.outputs:
        return {}
    overridden = {site for site in placement.outputs if config.site_activation(site)[0]}

    layers = dict(iter_quantized_layers(model))
    fed = layers_fed(flow)
    schemes, winners = site_schemes(placement, layers, config, fed)

    def new_quantizer(site: str) -> ActivationQuantizer:
        quantizer = ActivationQuantizer(
            schemes[site], config.observer, f"output of {site}", config.percentile
        )
        quantizer.site = site
        quantizer.site_kind = f"{placement.kinds[site]} output"
        return quantizer

    paths: dict[str, str] = {}  # site -> path of its quantizer below the root
    per_call: dict[str, dict[int, str]] = {}  # module called at several sites
    for site, node in placement.outputs.items():
        if schemes.get(site) is None:
            continue  # kept FP32: overridden so, or every layer around it is FP32
        if node.kind == "function" or _called_with_weights_at_sites(node, flow.calls):
            paths[site] = install_function_sites(model).add(site, new_quantizer(site))
        elif site in placement.slots:
            slot = placement.slots[site]
            set_submodule(
                model, slot, OutputQuantized(find_submodule(model, slot), new_quantizer(site))
            )
            paths[site] = f"{slot}.output_quantizer"
        elif flow.calls.get(node.name, 0) > 1:
            index = int(site.rsplit("#", 1)[1])
            per_call.setdefault(node.name, {})[index] = site
        elif isinstance(node.module, QuantizedLayer):
            node.module.output_quantizer = new_quantizer(site)
            paths[site] = f"{node.name}.output_quantizer"
        else:
            set_submodule(model, node.name, OutputQuantized(node.module, new_quantizer(site)))
            paths[site] = f"{node.name}.output_quantizer"
    for name, sites in per_call.items():
        shared = PerCallSite(find_submodule(model, name), flow.calls[name])
        for index, site in sites.items():
            shared.sites[index] = OutputQuantized(shared.sites[index], new_quantizer(site))
            paths[site] = f"{name}.sites.{index}.output_quantizer"
        set_submodule(model, name, shared)
        install_function_sites(model)  # resets the clones' call counters at every forward
    raised: dict[str, str] = {}
    for layer_name, site in placement.share.items():
        if site in paths and layer_name in layers:
            layer = layers[layer_name]
            if layer.input_quantizer.scheme != schemes[site] and site in overridden:
                continue  # a site overridden to another precision: the layer requantizes
            if layer.input_quantizer.scheme != schemes[site]:  # the higher precision won
                raised[layer_name] = winners[site]
                old = layer.input_quantizer
                layer.input_quantizer = ActivationQuantizer(
                    schemes[site], old.observer_name, old.tensor_name, old.percentile
                )
            layer.input_quantizer.shares_scale_of = paths[site]
    for (layer_name, call), site in placement.call_share.items():
        layer = layers.get(layer_name)
        if site in paths and isinstance(layer, QuantizedLayerCalls):
            quantizer = layer.call_input_quantizers[call - 1]
            if quantizer.scheme != schemes[site] and site in overridden:
                continue
            if quantizer.scheme != schemes[site]:  # the site's precision serves both
                quantizer = ActivationQuantizer(
                    schemes[site],
                    quantizer.observer_name,
                    quantizer.tensor_name,
                    quantizer.percentile,
                )
                layer.call_input_quantizers[call - 1] = quantizer
            quantizer.shares_scale_of = paths[site]
    return raised


def insert_matmul_input_quantizers(
    model: nn.Module, flow: DataFlow, config: QuantConfig, site_names: list[str] | None = None
) -> int:
    """A quantizer on both inputs of every activation x activation matmul outside a layer
    (attention's ``Q K^T`` and ``attn V``), keyed by its call site: the override naming the
    site, else the highest precision of the layers its output feeds (FP32 when all are FP32),
    else the config's activation scheme; returns how many matmuls got them. ``site_names``
    receives every input site."""
    if config.activation is None:
        return 0
    count = 0
    layers = dict(iter_quantized_layers(model))
    fed = layers_fed(flow)
    for node in flow.nodes:
        op = node.op
        if node.kind != "function" or not op.quantized_inputs or node.reads_parameter:
            continue
        if len(node.inputs) != op.tensor_inputs:
            continue
        sites = install_function_sites(model)
        placed = 0
        for index in range(op.tensor_inputs):
            site = input_site(node.site, index)
            if site_names is not None:
                site_names.append(site)
            pattern, scheme = config.site_activation(site)
            if pattern is None:
                names = fed.get(node.outputs[0], ()) if node.outputs else ()
                scheme = _follow_layers(names, layers, config.activation)
            if scheme is None:
                continue
            quantizer = ActivationQuantizer(
                scheme, config.observer, f"input {index} of {node.site}", config.percentile
            )
            quantizer.site, quantizer.site_kind = site, f"{op.name} input"
            sites.add(site, quantizer)
            placed += 1
        count += placed > 0
    return count


def _follow_layers(
    names: Any, layers: dict[str, QuantizedLayer], default: Scheme | None
) -> Scheme | None:
    """The highest activation precision among the layers ``names`` (None when all are FP32),
    ``default`` when there are none."""
    schemes = [_input_scheme(layers.get(name)) for name in names]
    if not schemes:
        return default
    quantized = [scheme for scheme in schemes if scheme is not None]
    return max(quantized, key=lambda scheme: scheme.bits) if quantized else None


def _input_scheme(layer: QuantizedLayer | None) -> Scheme | None:
    """The scheme of a layer's input quantizer; None for a layer kept FP32 or weight-only."""
    if layer is None or layer.input_quantizer is None or layer.input_quantizer.dynamic:
        return None
    return layer.input_quantizer.scheme


def layers_fed(flow: DataFlow) -> dict[Key, tuple[str, ...]]:
    """For each tensor of the flow, the layers with weights (quantized or FP32) that read it
    directly or through ops without weights (pooling, reshapes, adds, concats, activations)."""
    consumers = flow.consumers()
    fed: dict[Key, tuple[str, ...]] = {}
    for node in reversed(flow.nodes):  # the calls in reverse: consumers are known first
        for key in node.outputs:
            names: dict[str, None] = {}
            for user in consumers.get(key, ()):
                if _is_layer(user):
                    names[_layer_name(user)] = None
                else:
                    for out in user.outputs:
                        names.update(dict.fromkeys(fed.get(out, ())))
            fed[key] = tuple(names)
    return fed


def _is_layer(node: FlowNode) -> bool:
    module = node.module
    return isinstance(module, QuantizedLayer) or (
        module is not None and layer_kind(module) is not None
    )


def _layer_name(node: FlowNode) -> str:
    module = node.module
    return module.layer_name if isinstance(module, QuantizedLayer) else node.name


def mark_model_inputs(flow: DataFlow) -> None:
    """Name the input quantizers of layers that read the model's input (``report.sites``)."""
    made = flow.producer()
    for node in flow.nodes:
        layer = node.module
        if not isinstance(layer, QuantizedLayer) or layer.input_quantizer is None:
            continue
        key = node.inputs[0] if node.inputs else None
        while key in made and made[key].op.output == KEEPS_GRID and made[key].inputs:
            key = made[key].inputs[0]  # through a clone / reshape of the input
        if key is not None and key not in made:
            layer.input_quantizer.site_kind = "model input"


def split_layer_calls(model: nn.Module, flow: DataFlow, config: QuantConfig) -> None:
    """Give each quantized layer called at several sites one input quantizer per call
    (``engine.layer_calls``). The flow's nodes are pointed at the new modules."""
    for name, layer in list(iter_quantized_layers(model)):
        count = flow.calls.get(layer.layer_name, 0)
        if count < 2 or layer.input_quantizer is None or isinstance(layer, QuantizedLayerCalls):
            continue
        scheme = layer.input_quantizer.scheme

        def new_input_quantizer(index: int, scheme=scheme, name=name) -> ActivationQuantizer:
            return ActivationQuantizer(
                scheme, config.observer, f"input of {name} (call {index})", config.percentile
            )

        calls = QuantizedLayerCalls(layer, count, new_input_quantizer)
        set_submodule(model, name, calls)
        install_function_sites(model)  # resets the call counter at every forward
        for node in flow.nodes:
            if node.module is layer:
                node.module = calls


def site_schemes(
    placement: Placement,
    layers: dict[str, QuantizedLayer],
    config: QuantConfig,
    fed: dict[Key, tuple[str, ...]] | None = None,
) -> tuple[dict[str, Scheme | None], dict[str, str]]:
    """The scheme of each placed output quantizer: the override naming its site when one does
    (``QuantConfig.site_activation``); else the highest precision among the layer whose output
    it quantizes, the layers whose input shares it and the layers it feeds (``fed``: through
    ops without weights), None (FP32) when all of those are FP32, the config's when there are
    none; and, per site, the layer or override whose precision won."""
    sharing: dict[str, list[str]] = {}
    for layer_name, site in placement.share.items():
        sharing.setdefault(site, []).append(layer_name)
    schemes: dict[str, Scheme | None] = {}
    winners: dict[str, str] = {}
    for site, node in placement.outputs.items():
        pattern, scheme = config.site_activation(site)
        if pattern is not None:
            schemes[site] = scheme
            winners[site] = f"overrides[{pattern!r}]"
            continue
        around = [placement.origins.get(site), *sharing.get(site, [])]
        if fed is not None and node.outputs:
            around += fed.get(node.outputs[0], ())
        around = list(dict.fromkeys(n for n in around if n is not None))
        names = [n for n in around if _input_scheme(layers.get(n)) is not None]
        candidates = [layers[name].input_quantizer.scheme for name in names]
        if around and not names:
            schemes[site] = None  # every layer around the site is FP32
            continue
        if names:
            best = max(range(len(names)), key=lambda i: candidates[i].bits)
            winners[site] = names[best]
        else:
            candidates = [config.activation] if config.activation is not None else []
        if not candidates:  # weight-only config, only overridden layers elsewhere
            candidates = [
                layer.input_quantizer.scheme
                for layer in layers.values()
                if layer.input_quantizer is not None
            ]
        schemes[site] = max(candidates, key=lambda scheme: scheme.bits)
    return schemes, winners


def round_bias(layer: QuantizedLayer) -> None:
    """Round a quantized layer's bias to the INT32 grid of ``s_input * s_weight`` (in place)."""
    bias = layer.layer.bias
    if bias is None or layer.input_quantizer is None or layer.input_quantizer.dynamic:
        return  # a dynamic input's scale changes per call: the bias stays FP32
    if layer.weight_quantizer.scheme.group_size is not None:
        return  # block-wise weights run on MatMulNBits, which adds the bias in FP32
    with torch.no_grad():
        scale = bias_scale_of(layer)
        bias.copy_(torch.round(bias / scale).clamp(-(2**31), 2**31 - 1) * scale)


def bias_scale_of(layer: QuantizedLayer) -> torch.Tensor:
    """``s_input * s_weight`` (one per output channel when the weight is per-channel)."""
    return bias_scale_for(layer, layer.input_quantizer)


def finish_output_quantizers(model: nn.Module) -> None:
    """After calibration: fix the output quantizers' qparams (unwrapping those that never saw
    data), give sharing layer inputs the same scale / zero point, and round biases."""
    for name, module in list(model.named_modules()):
        if isinstance(module, OutputQuantized) and not module.output_quantizer.calibrated:
            if module.observed_calls == 0 and name:
                set_submodule(model, name, module.module)
            else:
                module.output_quantizer.calibrate()
    sites = getattr(model, FunctionSites.ATTRIBUTE, None)
    if isinstance(sites, FunctionSites):
        for site in list(sites.site_names):
            quantizer = sites.quantizer(site)
            if quantizer.calibrated:
                continue
            if quantizer.observer is None or quantizer.observer.batches_seen == 0:
                sites.remove(site)  # the op never ran on the calibration data
            else:
                quantizer.calibrate()
    for _, layer in iter_quantized_layers(model):
        if layer.output_quantizer is not None and not layer.output_quantizer.calibrated:
            layer.output_quantizer.calibrate()
        for quantizer in getattr(layer, "call_input_quantizers", ()):
            if not quantizer.calibrated:
                quantizer.calibrate()
    for _, layer in iter_quantized_layers(model):
        quantizers = [layer.input_quantizer, *getattr(layer, "call_input_quantizers", ())]
        for quantizer in quantizers:
            source = scale_source(model, quantizer) if quantizer is not None else None
            if source is not None and source.calibrated:
                quantizer.share_qparams_of(source)
        round_bias(layer)
