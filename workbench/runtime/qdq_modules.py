"""Export-time stand-ins for the simulated model's quantizers and quantized layers.

Over 400 lines: one stand-in per exported kind (activation, Linear, conv, embedding, FP32 layer,
adaptive pool), each a torch Function or module with its ONNX ``symbolic``, sharing one spec.

Each stand-in computes in torch exactly what the simulated model computes (the same fake-quant
kernels, the same dequantized weights), and tells the TorchScript ONNX exporter, through an
autograd Function's ``symbolic``, which QDQ nodes to write:

* an activation quantizer -> ``QuantizeLinear -> DequantizeLinear`` (uint8 for asymmetric,
  int8 for symmetric schemes; a ``Clip`` first when the scheme has fewer than 256 codes);
* a quantized Linear -> ``DequantizeLinear(int8 W^T, axis=1) -> MatMul (-> Add bias)``: the
  weight is stored transposed, so no Transpose sits between DQ and MatMul (a weight-only 2-D
  Linear subtracts ``-bias``: ONNX Runtime would make MatMul + Add an FP32 Gemm);
* an embedding table (weight-only) -> ``Gather`` of its int8 rows, then each row times its
  own scale (gathered with it), the same ``(q - z) * s`` the simulation computes;
* a quantized Conv -> ``Conv(x, DequantizeLinear(int8 W, axis=0), DequantizeLinear(int32 b))``
  with the bias on the grid of ``s_input * s_weight``, which is what QLinearConv needs; a
  Linear with 2-D input -> ``Gemm`` with the same INT32 bias (QGemm; as MatMul + Add, ONNX
  Runtime's MatMulAddFusion would make a Gemm with an FP32 bias, which no integer kernel takes).

Custom-domain marker nodes (``workbench::Weight``, ``workbench::Site``) carry layer names
through the exporter; ``qdq_graph`` turns them into node / initializer names and removes them.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.engine.capture.modules import set_submodule, shared_copy
from workbench.engine.placement.call_sites import CountsCalls, FunctionSites
from workbench.engine.placement.data_flow import CONV_TYPES
from workbench.engine.placement.graph_quantizers import OutputQuantized
from workbench.engine.placement.layer_calls import QuantizedLayerCalls, bias_scale_for
from workbench.engine.placement.layers import (
    LayerWeights,
    QuantizedEmbedding,
    QuantizedLayer,
    StandsIn,
    smoothed_input,
)
from workbench.engine.quantizers.modules import OFF, QUANTIZE, ActivationQuantizer, applied_scale
from workbench.errors import ExportError
from workbench.runtime.blockwise_export import BlockwiseEmbedding, BlockwiseLinear
from workbench.runtime.blockwise_specs import blockwise_spec, deferred_blockwise_spec, spec_weight
from workbench.runtime.export_pools import (
    ADAPTIVE_AVG_POOLS,
    ExportAdaptiveAvgPool,
    ExportWholeInputAvgPool,
)
from workbench.runtime.per_call_specs import PerCallSpec
from workbench.runtime.qdq_ops import (
    ActivationSpec,
    LayerSpec,
    QuantDequantOp,
    QuantizedConvOp,
    QuantizedEmbeddingOp,
    QuantizedLinearOp,
    code_dtype,
)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# float32 rounds 2**31 - 1 up to 2**31, which wraps to INT32_MIN when cast: clamp float32
# codes to the largest float32 below 2**31 instead
INT32_MAX_FLOAT32 = 2**31 - 128


class ExportQuantDequant(PerCallSpec):
    """An activation quantizer, exported as QuantizeLinear -> DequantizeLinear."""

    def __init__(self, quantizer: ActivationQuantizer, name: str, site: str = "") -> None:
        super().__init__()
        if quantizer.mode != QUANTIZE or not quantizer.calibrated:
            raise ExportError(
                f"activation quantizer {name!r} is not calibrated; export the result of "
                "wb.ptq / wb.qat, not a model prepared by hand"
            )
        scale = applied_scale(quantizer).detach()
        self.spec = ActivationSpec(
            scale.reshape(()).to(torch.float32).clone(),
            quantizer.zero_point.detach().reshape(()).to(torch.int32).clone(),
            quantizer.scheme,
            site,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuantDequantOp.apply(x, self.call_spec())


def _conv_pads(conv: nn.Module) -> list[int]:
    """ONNX ``pads`` (all begins, then all ends) of a torch conv, 'same' / 'valid' included."""
    dims = conv.weight.dim() - 2
    if conv.padding == "valid":
        return [0] * (2 * dims)
    if conv.padding == "same":  # torch puts the odd extra pixel at the end
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.weight.shape[2:], strict=True)]
        return [t // 2 for t in totals] + [t - t // 2 for t in totals]
    return list(conv.padding) * 2


def _attrs_of_conv(conv: nn.Module) -> dict:
    if conv.padding_mode != "zeros":
        raise ExportError(
            f"conv with padding_mode={conv.padding_mode!r} cannot be exported as one ONNX Conv; "
            "use padding_mode='zeros' or exclude the layer"
        )
    dims = conv.weight.dim() - 2
    return {
        "strides_i": list(conv.stride),
        "pads_i": _conv_pads(conv),
        "dilations_i": list(conv.dilation),
        "group_i": int(conv.groups),
        "kernel_shape_i": list(conv.weight.shape[2 : 2 + dims]),
    }


def layer_spec(
    layer: QuantizedLayer, input_quantizer: ActivationQuantizer | None = None
) -> LayerSpec:
    """Codes, scales and the bias of one quantized layer, exactly as the simulation uses them
    (the bias on the grid of ``input_quantizer``, by default the layer's own)."""
    input_quantizer = input_quantizer or layer.input_quantizer
    module = layer.layer
    scheme = layer.weight_quantizer.scheme
    with torch.no_grad():
        weight_dq = layer.quantized_weight().detach().to(torch.float32)
        scale, zero_point = layer.weight_quantizer.qparams(module.weight)
        scale = scale.detach().to(torch.float32)
        zero_point = zero_point.detach().to(torch.int32)
        per_channel = scheme.per_channel and scale.dim() > 0 and scale.numel() > 1
        axis = scheme.axis % module.weight.dim() if per_channel else 0
        view = [1] * module.weight.dim()
        if per_channel:
            view[axis] = -1
        s, z = scale.reshape(view), zero_point.reshape(view).to(torch.float32)
        codes = torch.round(weight_dq / s) + z
        codes = codes.clamp(scheme.quant_min, scheme.quant_max).to(code_dtype(scheme))
        if not per_channel:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        zero_point = zero_point.to(code_dtype(scheme))
        bias = module.bias.detach().to(torch.float32).clone() if module.bias is not None else None
        bias_codes = bias_scale = None
        if isinstance(layer, QuantizedEmbedding):
            kind, conv_args = "embedding", None
        elif isinstance(module, nn.Linear):
            kind, conv_args = "linear", None
            codes = codes.t().contiguous()  # stored as W^T [in, out]: MatMul needs no Transpose
            axis = 1 - axis if per_channel else 0
        elif isinstance(module, CONV_TYPES):
            kind, conv_args = "conv", _attrs_of_conv(module)
        else:
            raise ExportError(
                f"layer {layer.layer_name!r} of type {type(module).__name__} cannot be exported "
                "as a quantized layer; exclude it (QuantConfig(exclude=...)) to keep it FP32"
            )
        static_input = input_quantizer is not None and not input_quantizer.dynamic
        if bias is not None and static_input:  # a dynamic input's bias stays FP32
            bias_scale = bias_scale_for(layer, input_quantizer)
            bias_codes = torch.round(bias / bias_scale).clamp(INT32_MIN, INT32_MAX_FLOAT32)
            bias = bias_codes * bias_scale
            bias_codes = bias_codes.to(torch.int32)
    return LayerSpec(
        layer.layer_name,
        kind,
        weight_dq,
        codes,
        scale,
        zero_point,
        axis,
        bias,
        bias_codes,
        bias_scale,
        conv_args,
        module if kind == "conv" else None,
    )


class ExportLayer(LayerWeights, CountsCalls, PerCallSpec, StandsIn):
    """A quantized layer, exported as DQ(int8 weight) -> MatMul / Conv. A layer called at
    several sites (``engine.placement.layer_calls``) has one input quantizer and one spec (its INT32
    bias on that input's grid) per call."""

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return spec_weight(self.spec), self.spec.bias  # the dequantized weight

    quantization_leaf = True  # one call site, as the QuantizedLayer it stands in for

    def __init__(self, layer: QuantizedLayer, deferred: bool = False) -> None:
        super().__init__()
        self.layer_name = layer.layer_name
        self.input_quantizer = layer.input_quantizer
        self.call_input_quantizers = nn.ModuleList(getattr(layer, "call_input_quantizers", ()))
        self.call_count = 1 + len(self.call_input_quantizers)
        # block-wise weights: MatMulNBits (weight-only, one call spec); ``deferred``: its
        # stored arrays are written later, layer by layer (the large-model export)
        blockwise = deferred_blockwise_spec(layer) if deferred else blockwise_spec(layer)
        self.specs_by_call = [blockwise or layer_spec(layer, q) for q in self._input_quantizers()]
        self.spec = self.specs_by_call[0]
        self.output_quantizer = layer.output_quantizer
        self.smoothing = layer.layer  # SmoothQuant's input scale, when the layer has one

    def stands_in_for(self) -> nn.Module | None:
        return self.__dict__.get("_modules", {}).get("smoothing")

    def _input_quantizers(self) -> list[nn.Module | None]:
        return [self.input_quantizer, *self.call_input_quantizers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantizer = self._input_quantizers()[self.next_call()]
        x = smoothed_input(self.smoothing, x)
        if quantizer is not None:
            x = quantizer(x)
        spec = self.call_spec()
        if spec.kind == "blockwise_embedding":
            return BlockwiseEmbedding.apply(x, spec)
        if spec.kind == "embedding":
            return QuantizedEmbeddingOp.apply(x, spec)
        if spec.kind == "blockwise":
            out = BlockwiseLinear.apply(x, spec)
        elif spec.kind == "linear":
            out = QuantizedLinearOp.apply(x, spec)
        else:
            out = QuantizedConvOp.apply(x, spec)
        if self.output_quantizer is not None:
            out = self.output_quantizer(out)
        return out


class ExportFloatLayer(LayerWeights, StandsIn):
    """A quantized layer whose weight quantization is switched off: its FP32 module, between
    the quantizers it still has."""

    quantization_leaf = True

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__()
        self.layer_name = layer.layer_name
        self.layer = layer.layer
        self.input_quantizer = layer.input_quantizer
        self.output_quantizer = layer.output_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        out = self.layer(x)
        return self.output_quantizer(out) if self.output_quantizer is not None else out


def _stand_in_for_layer(layer: QuantizedLayer, deferred: bool = False) -> nn.Module:
    from workbench.runtime.dynamic_export import ExportDynamicLinear, is_dynamic_linear

    if is_dynamic_linear(layer):
        return ExportDynamicLinear(layer, layer_spec(layer))
    if layer.weight_quantizer.enabled:
        return ExportLayer(layer, deferred)
    if isinstance(layer, QuantizedLayerCalls):
        return layer  # FP32 weight, its per-call input quantizers replaced like any other
    return ExportFloatLayer(layer)


def _stand_in_for_quantizer(quantizer: ActivationQuantizer, name: str, site: str) -> nn.Module:
    if quantizer.mode == OFF and quantizer.calibrated:
        return nn.Identity()  # switched off (sensitivity / mixed precision): FP32 here
    return ExportQuantDequant(quantizer, name, site)


def exportable_model(model: nn.Module, deferred: bool = False) -> nn.Module:
    """A copy of the simulated ``model`` whose quantizers and quantized layers export as QDQ
    (sharing its tensors). ``deferred``: block-wise Linear weights are placeholders, written
    layer by layer after tracing (``onnx_export``'s large-model path)."""
    model = shared_copy(model)
    sites = {
        f"{name}.output_quantizer" if name else "output_quantizer": name
        for name, module in model.named_modules()
        if isinstance(module, OutputQuantized)
    }
    function_sites = getattr(model, FunctionSites.ATTRIBUTE, None)
    if isinstance(function_sites, FunctionSites):
        sites.update(function_sites.site_of_path())
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer) and module.output_quantizer is not None:
            sites[f"{name}.output_quantizer" if name else "output_quantizer"] = module.layer_name
    root_layer = None
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLayer):
            if name:
                set_submodule(model, name, _stand_in_for_layer(module, deferred))
            else:
                root_layer = _stand_in_for_layer(module, deferred)
    model = root_layer if root_layer is not None else model
    for name, module in list(model.named_modules()):
        if isinstance(module, ActivationQuantizer):
            set_submodule(model, name, _stand_in_for_quantizer(module, name, sites.get(name, "")))
        elif isinstance(module, ADAPTIVE_AVG_POOLS) and name:
            set_submodule(model, name, ExportAdaptiveAvgPool(module))
        elif type(module) in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d) and name:
            set_submodule(model, name, ExportWholeInputAvgPool(module))
    return model
