"""Where output quantizers go: which call sites get one (``engine.placement.op_kinds``' table read
over
the data flow), which layer inputs then share its scale, and each site's scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from workbench.core.scheme import Scheme
from workbench.engine.capture.modules import find_submodule
from workbench.engine.config import QuantConfig
from workbench.engine.placement.data_flow import DataFlow, FlowNode, Key
from workbench.engine.placement.layers import QuantizedLayer
from workbench.engine.placement.op_kinds import (
    CLAMP,
    CONV,
    FLOAT_FEEDING_GRID,
    KEEPS_GRID,
    QUANTIZED_OUTPUT,
)


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


def can_hold_quantizer(node: FlowNode, calls: dict[str, int]) -> bool:
    """Whether a quantizer can be attached to this call: every call can
    (``engine.placement.call_sites``:
    a module called once holds it, a parameter-free module called at several sites becomes one
    clone per call, a layer with weights called at several sites and a tensor op get it keyed
    by their call site)."""
    return node.kind == "function" or node.module is not None


def plan_output_quantizers(
    model: nn.Module, flow: DataFlow, folded_bn: dict[str, str] | None = None
) -> Placement:
    """Decide which call sites get an output quantizer (``engine.placement.op_kinds``' table) and
    which
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
            if any(user.op.grid_inputs for user in readers) and can_hold_quantizer(
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
            and can_hold_quantizer(users[0], flow.calls)
        ):
            target = users[0]
        elif not can_hold_quantizer(node, flow.calls):
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


def called_with_weights_at_sites(node: FlowNode, calls: dict[str, int]) -> bool:
    """A module with parameters (a shared conv) called at several sites: one clone per call
    would duplicate its weight, so its output quantizers are keyed by call site instead."""
    if node.module is None or calls.get(node.name, 0) < 2:
        return False
    return any(True for _ in node.module.parameters())


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
        names = [n for n in around if input_scheme(layers.get(n)) is not None]
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


def input_scheme(layer: QuantizedLayer | None) -> Scheme | None:
    """The scheme of a layer's input quantizer; None for a layer kept FP32 or weight-only."""
    if layer is None or layer.input_quantizer is None or layer.input_quantizer.dynamic:
        return None
    return layer.input_quantizer.scheme
