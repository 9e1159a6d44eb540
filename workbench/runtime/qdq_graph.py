"""Rewrite an exported QDQ graph into the exact patterns ONNX Runtime fuses.

The passes read and mutate one graph index (``qdq_index.GraphIndex``) and run in order in
``finalize_qdq_graph``; the conv rewrites (6 and 7) live in ``conv_rewrites``.

Every pass keeps the values the graph computes (each is exact on the quantization grid):

1. ``Constant`` nodes become initializers (the int8 weights are stored once, as int8);
   MatMulNBits nodes of block-wise Linear layers are named after their layers
   (``blockwise_export.resolve_blockwise_layers``).
2. Marker nodes from ``qdq_modules`` name each quantized layer's node and weight initializers
   after the layer (``layer1.0.conv1``, ``layer1.0.conv1.weight_quantized``) and are removed.
3. A per-tensor ``DequantizeLinear`` moves past ops that only move or select values
   (MaxPool, Flatten, Reshape, Transpose, Squeeze, Unsqueeze, Identity): ``P(DQ(q)) = DQ(P(q))``,
   so MaxPool runs on uint8 and the next layer sees a DQ directly.
4. ``QuantizeLinear(DequantizeLinear(q))`` with the same scale and zero point is ``q``: removed.
5. Identical ``QuantizeLinear`` nodes on one tensor (one input feeding three Linear layers)
   become one.
6. A strided conv with few input channels (an image stem) reads a space-to-depth
   rearrangement of its uint8 input instead (:func:`space_to_depth_stem`): same integers out.
7. With ``amx=True``, convs' int8 weights are stored with zero point -1
   (:func:`route_convs_to_qgemm`): the same values, run on ONNX Runtime's AMX GEMM.
8. Each ``DequantizeLinear`` gets a single consumer (ONNX Runtime fuses per consumer).
9. Dead nodes and initializers are pruned; nodes are put back in topological order.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper

from workbench.runtime.blockwise_export import (
    DEFAULT_ACCURACY_LEVEL,
    ensure_ort_domain,
    resolve_blockwise_layers,
)
from workbench.runtime.conv_rewrites import route_convs_to_qgemm, space_to_depth_stem
from workbench.runtime.dynamic_export import resolve_dynamic_weights
from workbench.runtime.graph_info import GraphInfo, QuantizedLayerInfo
from workbench.runtime.qdq_index import GraphIndex as _Graph
from workbench.runtime.qdq_index import per_tensor_dq, unique_name
from workbench.runtime.qdq_ops import MARKER_DOMAIN

GRID_PRESERVING_OPS = {
    "MaxPool",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
}


def constants_to_initializers(graph: onnx.GraphProto) -> None:
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _attr(node: onnx.NodeProto, name: str):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


def _drop_marker(g: _Graph, marker: onnx.NodeProto) -> None:
    g.replace_uses(marker.output[0], marker.input[0])
    g.remove(marker)


def resolve_markers(g: _Graph) -> GraphInfo:
    """Name quantized layers' nodes and weights after the layers; drop the marker nodes."""
    info = GraphInfo()
    for marker in [n for n in g.graph.node if n.domain == MARKER_DOMAIN and n.op_type == "Site"]:
        site = _attr(marker, "site")
        site = site.decode() if isinstance(site, bytes) else site
        info.sites[site] = marker.input[0]
        _drop_marker(g, marker)
    for marker in [n for n in g.graph.node if n.domain == MARKER_DOMAIN and n.op_type == "Table"]:
        layer = _attr(marker, "layer")
        layer = layer.decode() if isinstance(layer, bytes) else layer
        _drop_marker(g, marker)
        g.rename_initializer(marker.input[0], f"{layer}.weight_quantized")
    calls: dict[str, int] = {}
    for marker in [n for n in g.graph.node if n.domain == MARKER_DOMAIN and n.op_type == "Weight"]:
        layer = _attr(marker, "layer")
        layer = layer.decode() if isinstance(layer, bytes) else layer
        # a layer the model calls at several sites: later calls are named layer#1, layer#2, ...
        call = calls.get(layer, 0)
        calls[layer] = call + 1
        name = f"{layer}#{call}" if call else layer
        dq = g.producer[marker.input[0]]
        targets = g.consumers.get(marker.output[0], [])
        _drop_marker(g, marker)
        dq.name = f"{name}/weight_dequantize"
        suffixes = ("weight_quantized", "weight_scale", "weight_zero_point")
        for old, suffix in zip(dq.input, suffixes, strict=False):
            g.rename_initializer(old, f"{name}.{suffix}")
        if call:  # the same weight as the first call's: one initializer, read by every call
            _share_initializers(g, dq, layer, suffixes)
        if not targets:
            continue
        target = targets[0]
        target.name = name
        output = target.output[0]
        if target.op_type == "Conv" and len(target.input) > 2 and target.input[2]:
            bias_dq = g.producer.get(target.input[2])
            if bias_dq is not None and bias_dq.op_type == "DequantizeLinear":
                bias_dq.name = f"{name}/bias_dequantize"
                suffixes = ("bias_quantized", "bias_scale", "bias_zero_point")
                for old, suffix in zip(bias_dq.input, suffixes, strict=False):
                    g.rename_initializer(old, f"{name}.{suffix}")
        users = g.consumers.get(output, [])
        if target.op_type == "MatMul" and len(users) == 1 and users[0].op_type in ("Add", "Sub"):
            users[0].name = f"{name}/bias_add"
            output = users[0].output[0]
        # one row per call: the report keeps one row per layer (``call`` 0), the fusion check
        # lists every call's kernel
        info.layers.append(
            QuantizedLayerInfo(layer, target.op_type, name, dq.input[0], output, call)
        )
    info.layers += [QuantizedLayerInfo(*row) for row in resolve_dynamic_weights(g)]
    g.refresh()
    return info


def _share_initializers(g: _Graph, dq: onnx.NodeProto, layer: str, suffixes) -> None:
    """Point ``dq`` at the first call's initializers where they hold the same values."""
    for index, suffix in enumerate(suffixes):
        if index >= len(dq.input):
            break
        first, mine = f"{layer}.{suffix}", dq.input[index]
        a, b = g.array(first), g.array(mine)
        if a is not None and b is not None and a.dtype == b.dtype and np.array_equal(a, b):
            dq.input[index] = first


def commute_dequantize(g: _Graph) -> bool:
    """P(DQ(q)) -> DQ(P(q)) for ops that only move values, in one pass over the graph (a chain
    of such ops is handled in the same pass: the moved DQ is the next op's input)."""
    changed = False
    for node in list(g.graph.node):
        if node.op_type not in GRID_PRESERVING_OPS or not node.input:
            continue
        if len([o for o in node.output if o]) != 1:
            continue
        dq = per_tensor_dq(g, node.input[0])
        if dq is None:
            continue
        position = list(g.graph.node).index(node)
        codes = unique_name(g, f"{node.output[0]}_quantized")
        moved = onnx.NodeProto()
        moved.CopyFrom(node)
        moved.input[0] = dq.input[0]
        moved.output[0] = codes
        dequantize = helper.make_node(
            "DequantizeLinear",
            [codes, *dq.input[1:]],
            [node.output[0]],
            name=unique_name(g, f"{node.name or node.output[0]}/dequantize"),
        )
        g.remove(node)
        g.insert(position, dequantize)
        g.insert(position, moved)
        changed = True
    return changed


def _axis(node: onnx.NodeProto) -> int:
    axis = _attr(node, "axis")
    return 1 if axis is None else int(axis)  # QuantizeLinear / DequantizeLinear's default


def _same_qparams(g: _Graph, a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    if len(a.input) < 3 or len(b.input) < 3:
        return False
    scale_a, scale_b = g.array(a.input[1]), g.array(b.input[1])
    zero_a, zero_b = g.array(a.input[2]), g.array(b.input[2])
    if any(v is None for v in (scale_a, scale_b, zero_a, zero_b)):
        return False
    per_tensor = scale_a.ndim == 0 and scale_b.ndim == 0
    return (
        scale_a.shape == scale_b.shape
        and zero_a.dtype == zero_b.dtype
        and np.array_equal(scale_a, scale_b)
        and np.array_equal(zero_a, zero_b)
        and (per_tensor or _axis(a) == _axis(b))
    )


def remove_requantize_identity(g: _Graph, renames: dict[str, str]) -> bool:
    """Q(DQ(q)) with the DQ's own scale and zero point is q."""
    changed = False
    for node in _inner_quantize_nodes(g):
        dq = per_tensor_dq(g, node.input[0])
        if dq is not None and _same_qparams(g, node, dq):
            _replace_quantize(g, node, dq.input[0], renames)
            changed = True
    return changed


def merge_duplicate_quantize(g: _Graph, renames: dict[str, str]) -> bool:
    """One QuantizeLinear per (tensor, scale, zero point)."""
    changed = False
    seen: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in _inner_quantize_nodes(g):
        twin = next((k for k in seen[node.input[0]] if _same_qparams(g, k, node)), None)
        if twin is None:
            seen[node.input[0]].append(node)
        else:
            _replace_quantize(g, node, twin.output[0], renames)
            changed = True
    return changed


def _inner_quantize_nodes(g: _Graph) -> list[onnx.NodeProto]:
    """The QuantizeLinear nodes whose output is not a graph output (those may be removed)."""
    return [
        node
        for node in g.graph.node
        if node.op_type == "QuantizeLinear" and node.output[0] not in g.outputs
    ]


def _replace_quantize(g: _Graph, node: onnx.NodeProto, tensor: str, renames: dict) -> None:
    """Read ``tensor`` wherever ``node``'s output was read, and remove ``node``."""
    g.replace_uses(node.output[0], tensor)
    renames[node.output[0]] = tensor
    g.remove(node)


def split_shared_dequantize(g: _Graph) -> None:
    """Give each consumer of a DequantizeLinear its own copy (ONNX Runtime fuses per node)."""
    for position in range(len(g.graph.node) - 1, -1, -1):
        node = g.graph.node[position]
        if node.op_type != "DequantizeLinear":
            continue
        users = g.consumers.get(node.output[0], [])
        for index, user in enumerate(users[1:], start=1):
            copy_name = unique_name(g, f"{node.output[0]}_{index}")
            clone = helper.make_node(
                "DequantizeLinear",
                list(node.input),
                [copy_name],
                name=unique_name(g, f"{node.name or node.output[0]}_{index}"),
                **({"axis": _attr(node, "axis")} if _attr(node, "axis") is not None else {}),
            )
            for i, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[i] = copy_name
            g.graph.node.insert(position + 1, clone)
            g.producer[copy_name] = clone
    g.refresh()


def implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """The outer values a node's subgraphs read (a Loop / If / Scan body uses them by name
    without listing them as the node's inputs; ``nn.EmbeddingBag`` exports such a Loop)."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = list(attribute.graphs)
        if attribute.HasField("g"):
            graphs.append(attribute.g)
        for body in graphs:
            local = {i.name for i in body.input} | {i.name for i in body.initializer}
            for inner in body.node:
                local.update(inner.output)
            for inner in body.node:
                reads = set(inner.input) | implicit_inputs(inner)
                names.update(name for name in reads if name and name not in local)
    return names


def prune(g: _Graph) -> None:
    """Remove nodes whose outputs nobody uses, then unused initializers (a value read only
    inside a subgraph counts as used)."""
    while True:
        inside = {name for node in g.graph.node for name in implicit_inputs(node)}
        dead = [
            node
            for node in g.graph.node
            if all(
                not g.consumers.get(o) and o not in g.outputs and o not in inside
                for o in node.output
                if o
            )
        ]
        if not dead:
            break
        for node in dead:
            g.remove(node)
    used = {name for node in g.graph.node for name in node.input} | g.outputs
    used |= {name for node in g.graph.node for name in implicit_inputs(node)}
    kept = [init for init in g.graph.initializer if init.name in used]
    del g.graph.initializer[:]
    g.graph.initializer.extend(kept)
    g.refresh()


def topological_sort(graph: onnx.GraphProto) -> None:
    """Order the nodes so that each comes after the producers of its inputs, also those its
    subgraphs read (Kahn's algorithm, linear in the graph's size); among ready nodes the
    earliest in the current order goes first, so an already sorted graph keeps its order."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)
    unmet: list[int] = []
    waiting: dict[str, list[int]] = defaultdict(list)
    ready: list[int] = []
    for index, node in enumerate(nodes):
        reads = set(node.input) | implicit_inputs(node)
        needed = {name for name in reads if name not in available}
        unmet.append(len(needed))
        for name in needed:
            waiting[name].append(index)
        if not needed:
            ready.append(index)
    heapq.heapify(ready)
    ordered: list[onnx.NodeProto] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        ordered.append(node)
        for name in node.output:
            for user in waiting.pop(name, ()):
                unmet[user] -= 1
                if unmet[user] == 0:
                    heapq.heappush(ready, user)
    if len(ordered) < len(nodes):
        stuck = next(node for index, node in enumerate(nodes) if unmet[index] > 0)
        raise ValueError(f"graph has a cycle or a missing input near node {stuck.name!r}")
    del graph.node[:]
    graph.node.extend(ordered)


def finalize_qdq_graph(
    model: onnx.ModelProto, amx: bool = False, accuracy_level: int = DEFAULT_ACCURACY_LEVEL
) -> GraphInfo:
    """Apply every pass (module docstring) to ``model`` in place; returns the layer map.

    ``amx``: also :func:`route_convs_to_qgemm` (for CPUs with AMX-INT8). ``accuracy_level``:
    of the MatMulNBits nodes of block-wise Linear layers (``blockwise_export``)."""
    graph = model.graph
    constants_to_initializers(graph)
    blockwise_rows = resolve_blockwise_layers(graph, accuracy_level)
    g = _Graph(graph)
    info = resolve_markers(g)
    info.layers.extend(QuantizedLayerInfo(**row) for row in blockwise_rows)
    renames: dict[str, str] = {}
    while True:
        changed = commute_dequantize(g)
        changed |= remove_requantize_identity(g, renames)
        changed |= merge_duplicate_quantize(g, renames)
        if not changed:
            break
    prune(g)
    space_to_depth_stem(model, g)
    if amx:
        route_convs_to_qgemm(g)
    split_shared_dequantize(g)
    topological_sort(graph)
    del graph.value_info[:]
    for site, tensor in info.sites.items():
        while tensor in renames:
            tensor = renames[tensor]
        info.sites[site] = tensor
    _drop_marker_domain(model)
    ensure_ort_domain(model)
    info.to_metadata(model)
    return info


def _drop_marker_domain(model: onnx.ModelProto) -> None:
    kept = [op for op in model.opset_import if op.domain != MARKER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
