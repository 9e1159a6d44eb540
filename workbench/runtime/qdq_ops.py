"""The ONNX ops the export stand-ins (``qdq_modules``) trace into: autograd Functions whose
``forward`` computes the simulated values and whose ``symbolic`` writes QuantizeLinear /
DequantizeLinear around them, with marker nodes (domain :data:`MARKER_DOMAIN`) that
``qdq_graph`` resolves into layer names and removes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.core.fake_quant import fake_quantize
from workbench.core.scheme import Scheme

MARKER_DOMAIN = "workbench"


def code_dtype(scheme: Scheme) -> torch.dtype:
    """int8 codes for signed schemes, uint8 for unsigned ones (sub-8-bit codes fit in them)."""
    return torch.int8 if scheme.signed else torch.uint8


# activations ---------------------------------------------------------------------------------
@dataclass(eq=False)
class ActivationSpec:
    scale: torch.Tensor  # float32, 0-d
    zero_point: torch.Tensor  # int32, 0-d (simulation)
    scheme: Scheme
    site: str  # name of the output quantizer it is, or "" for a layer's input quantizer


class QuantDequantOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec: ActivationSpec):
        return fake_quantize(x, spec.scale, spec.zero_point, spec.scheme)

    @staticmethod
    def symbolic(g, x, spec: ActivationSpec):
        scheme = spec.scheme
        scale = g.op("Constant", value_t=spec.scale.reshape(()).to(torch.float32))
        zero = g.op("Constant", value_t=spec.zero_point.reshape(()).to(code_dtype(scheme)))
        full = (-128, 127) if scheme.signed else (0, 255)
        if (scheme.quant_min, scheme.quant_max) != full:
            z = float(spec.zero_point)
            s = float(spec.scale)
            low = g.op("Constant", value_t=torch.tensor((scheme.quant_min - z) * s))
            high = g.op("Constant", value_t=torch.tensor((scheme.quant_max - z) * s))
            x = g.op("Clip", x, low, high)
        q = g.op("QuantizeLinear", x, scale, zero)
        if spec.site:
            q = g.op(f"{MARKER_DOMAIN}::Site", q, site_s=spec.site)
        return g.op("DequantizeLinear", q, scale, zero)


# layers --------------------------------------------------------------------------------------
@dataclass(eq=False)
class LayerSpec:
    name: str
    kind: str  # "linear" or "conv"
    weight_dq: torch.Tensor  # the simulation's dequantized weight (as the layer uses it)
    codes: torch.Tensor  # int8 / uint8 codes as stored (Linear: transposed)
    scale: torch.Tensor  # float32, 0-d or [C]
    zero_point: torch.Tensor  # codes dtype, 0-d or [C]
    axis: int
    bias: torch.Tensor | None  # float32
    bias_codes: torch.Tensor | None  # int32 (conv with a quantized input)
    bias_scale: torch.Tensor | None  # float32 [C_out]
    conv_args: dict | None = None
    conv: nn.Module | None = None  # the FP32 conv (its _conv_forward), for the torch side


def _weight_dq(g, spec: LayerSpec):
    codes = g.op("Constant", value_t=spec.codes)
    scale = g.op("Constant", value_t=spec.scale)
    zero = g.op("Constant", value_t=spec.zero_point)
    kwargs = {"axis_i": spec.axis} if spec.scale.dim() > 0 else {}
    dq = g.op("DequantizeLinear", codes, scale, zero, **kwargs)
    return g.op(f"{MARKER_DOMAIN}::Weight", dq, layer_s=spec.name)


def _bias_dq(g, spec: LayerSpec):
    codes = g.op("Constant", value_t=spec.bias_codes)
    scale = g.op("Constant", value_t=spec.bias_scale)
    zero = g.op("Constant", value_t=torch.zeros_like(spec.bias_codes))
    return g.op("DequantizeLinear", codes, scale, zero, axis_i=0)


class QuantizedLinearOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec: LayerSpec):
        return F.linear(x, spec.weight_dq, spec.bias)

    @staticmethod
    def symbolic(g, x, spec: LayerSpec):
        rank = x.type().dim() if hasattr(x.type(), "dim") else None
        if rank == 2 and spec.bias_codes is not None:
            # a 2-D Linear is a Gemm; with an INT32 bias ONNX Runtime runs it as QGemm
            return g.op("Gemm", x, _weight_dq(g, spec), _bias_dq(g, spec))
        y = g.op("MatMul", x, _weight_dq(g, spec))
        if spec.bias is not None and rank == 2:
            # weight-only, 2-D: ONNX Runtime's MatMulAddFusion would turn MatMul + Add into an
            # FP32 Gemm before its DQ -> MatMul fusion (MatMulNBits) runs; y - (-b) is the same
            # sum (negation is exact) and matches no Gemm pattern
            return g.op("Sub", y, g.op("Constant", value_t=-spec.bias))
        if spec.bias is not None:
            y = g.op("Add", y, g.op("Constant", value_t=spec.bias))
        return y


class QuantizedConvOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec: LayerSpec):
        return spec.conv._conv_forward(x, spec.weight_dq, spec.bias)

    @staticmethod
    def symbolic(g, x, spec: LayerSpec):
        inputs = [x, _weight_dq(g, spec)]
        if spec.bias_codes is not None:
            inputs.append(_bias_dq(g, spec))
        elif spec.bias is not None:
            inputs.append(g.op("Constant", value_t=spec.bias))
        return g.op("Conv", *inputs, **spec.conv_args)


class QuantizedEmbeddingOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, spec: LayerSpec):
        return F.embedding(ids, spec.weight_dq)

    @staticmethod
    def symbolic(g, ids, spec: LayerSpec):
        codes = g.op("Constant", value_t=spec.codes)
        codes = g.op(f"{MARKER_DOMAIN}::Table", codes, layer_s=spec.name)
        rows = g.op("Gather", codes, ids, axis_i=0)
        scale = g.op("Constant", value_t=spec.scale)
        zero = g.op("Constant", value_t=spec.zero_point)
        if spec.scale.dim() == 0:
            return g.op("DequantizeLinear", rows, scale, zero)
        # one scale per row: gather each token's scale (and zero point) with its row
        last = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        values = g.op("Cast", rows, to_i=1)  # FLOAT
        if bool((spec.zero_point != 0).any()):
            zeros = g.op("Cast", g.op("Gather", zero, ids, axis_i=0), to_i=1)
            values = g.op("Sub", values, g.op("Unsqueeze", zeros, last))
        scales = g.op("Unsqueeze", g.op("Gather", scale, ids, axis_i=0), last)
        return g.op("Mul", values, scales)
