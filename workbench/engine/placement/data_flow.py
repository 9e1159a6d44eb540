"""The data flow of one real forward pass: which call site produced each tensor and which
call sites read it (global module hooks plus a ``TorchFunctionMode`` for tensor ops), the
graph the output-quantizer placement (``output_plan``) reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from workbench.engine.calibration.batches import run_model
from workbench.engine.placement.call_sites import (
    CallTracker,
    site_functions,
    tracked_calls,
)
from workbench.engine.placement.layers import QuantizedLayer
from workbench.engine.placement.op_kinds import (
    CONV,
    KEEPS_GRID,
    LINEAR,
    OTHER,
    OpKind,
    function_kind,
    layer_kind,
    module_kind,
)

# data flow -----------------------------------------------------------------------------------
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
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

    def on_function(site, name, func, args, kwargs):
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
            flow.nodes.append(node)
            flow.keep_alive.extend(inputs + outputs)
        return out

    functions = site_functions(tracker, on_function)
    with torch.no_grad(), tracked_calls(tracker, on_enter, on_leave), functions:
        run_model(model, batch)
    return flow


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
