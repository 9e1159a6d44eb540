"""Activation quantizers placed from the data flow, per call site, so that the simulated model
computes what an INT8 runtime computes.

The data-flow trace is ``engine.placement.data_flow``, the placement that reads it
``engine.placement.output_plan``;
this module installs the quantizers and holds the calibration-time steps (scale sharing, bias
rounding).

Module swapping quantizes the *inputs* of Linear / Conv layers. That is all a Linear needs
(ONNX Runtime runs DQ -> MatMul as MatMulIntegerToFloat, FP32 out), but a convolution runs as
an integer kernel only as DQ -> Conv -> Q (QLinearConv), a residual add only as
DQ, DQ -> Add -> Q (QLinearAdd), a concat as QLinearConcat, an average pool as
QLinearAveragePool. What each op kind needs is declared once, in ``engine.placement.op_kinds``; this
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

Quantizers attach to *call sites* (``engine.placement.call_sites``): a module called once is wrapped
in
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
from typing import Any

import torch
from torch import nn

from workbench.core.scheme import Scheme
from workbench.engine.calibration.batches import first_samples
from workbench.engine.capture.modules import find_submodule, set_submodule, writable
from workbench.engine.config import QuantConfig
from workbench.engine.placement.call_sites import (
    FunctionSites,
    PerCallSite,
    input_site,
    install_function_sites,
)
from workbench.engine.placement.data_flow import (
    DataFlow,
    layers_fed,
    mark_model_inputs,
    trace_data_flow,
)
from workbench.engine.placement.layer_calls import QuantizedLayerCalls, bias_scale_for
from workbench.engine.placement.layers import QuantizedLayer, iter_quantized_layers
from workbench.engine.placement.output_plan import (
    Placement,
    called_with_weights_at_sites,
    input_scheme,
    plan_output_quantizers,
    site_schemes,
)
from workbench.engine.quantizers.modules import OBSERVE, ActivationQuantizer, scale_source


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

    paths = _install(model, flow, placement, schemes, new_quantizer)
    return _share_scales(placement, layers, schemes, winners, paths, overridden)


def _install(
    model: nn.Module,
    flow: DataFlow,
    placement: Placement,
    schemes: dict[str, Scheme | None],
    new_quantizer,
) -> dict[str, str]:
    """Attach each placed site's quantizer where it can live (a function site, the folded
    BatchNorm's slot, a per-call clone, the layer, or a wrapper); the path of each."""
    paths: dict[str, str] = {}  # site -> path of its quantizer below the root
    per_call: dict[str, dict[int, str]] = {}  # module called at several sites
    for site, node in placement.outputs.items():
        if schemes.get(site) is None:
            continue  # kept FP32: overridden so, or every layer around it is FP32
        if node.kind == "function" or called_with_weights_at_sites(node, flow.calls):
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
    return paths


def _share_scales(
    placement: Placement,
    layers: dict[str, QuantizedLayer],
    schemes: dict[str, Scheme | None],
    winners: dict[str, str],
    paths: dict[str, str],
    overridden: set[str],
) -> dict[str, str]:
    """Point the layer inputs fed by a site at its quantizer (raising a layer's input
    precision to the site's when the higher one won); the layers raised, with the winner."""
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
    schemes = [input_scheme(layers.get(name)) for name in names]
    if not schemes:
        return default
    quantized = [scheme for scheme in schemes if scheme is not None]
    return max(quantized, key=lambda scheme: scheme.bits) if quantized else None


def split_layer_calls(model: nn.Module, flow: DataFlow, config: QuantConfig) -> None:
    """Give each quantized layer called at several sites one input quantizer per call
    (``engine.placement.layer_calls``). The flow's nodes are pointed at the new modules."""
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


def round_bias(layer: QuantizedLayer) -> None:
    """Round a quantized layer's bias to the INT32 grid of ``s_input * s_weight`` (in place)."""
    bias = layer.layer.bias
    if bias is None or layer.input_quantizer is None or layer.input_quantizer.dynamic:
        return  # a dynamic input's scale changes per call: the bias stays FP32
    if layer.weight_quantizer.scheme.group_size is not None:
        return  # block-wise weights run on MatMulNBits, which adds the bias in FP32
    with torch.no_grad():
        scale = bias_scale_of(layer)
        writable(layer.layer, "bias").copy_(
            torch.round(bias / scale).clamp(-(2**31), 2**31 - 1) * scale
        )


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
