"""One table: what each op kind needs around it to run on an ONNX Runtime integer kernel.

Every call in a model's forward (a module call or a tensor op such as ``out + identity``) has
a kind. The placement pass (``engine.placement.graph_quantizers``) reads only this table:

* ``QUANTIZED_OUTPUT``: the op runs as an integer kernel when its inputs arrive quantized and
  its output is quantized right after it (``DQ -> Conv -> Q`` is QLinearConv,
  ``DQ, DQ -> Add -> Q`` QLinearAdd). With ``grid_inputs`` the op is quantized only when every
  input already sits on a quantization grid (quantizing float inputs just for it would add
  work, e.g. a transformer's residual add between float LayerNorms).
* ``CLAMP``: a ReLU-like op (ReLU, ReLU6, hardtanh from 0). When it alone consumes an op of
  the first kind, the output quantizer goes after it: with zero point 0 (and a range inside the
  clamp's) ONNX Runtime drops it into the kernel, and the simulation clamps as the kernel does.
* ``KEEPS_GRID``: ops that only move or select values (max pooling, flatten / view / reshape,
  dropout at inference): values on a grid stay on it, so the next quantized layer takes the
  scale over and the export moves the dequantization past them (MaxPool runs on uint8).
* ``FLOAT_FEEDING_GRID``: a float activation (hardswish, hardsigmoid, SiLU, sigmoid) runs in
  FP32, but its output is quantized when an op that needs grid inputs (an add, a concat, an
  average pool, a multiplication) reads it: a squeeze-excitation block then runs its pooling
  and its ``scale * x`` as QLinearGlobalAveragePool and QLinearMul instead of float ops between
  layout transposes.
* ``FLOAT``: anything else runs in FP32 between a DequantizeLinear and the next quantizer.

``quantized_inputs``: an activation x activation matmul (attention's ``Q K^T``, ``attn V``)
gets a quantizer on each input when ``QuantConfig(quantize_attention_matmuls=True)``: ONNX
Runtime then runs ``DQ, DQ -> MatMul`` as MatMulIntegerToFloat (FP32 out, for the softmax or
the reshape after it).

Linear layers need no output quantizer: ``DQ -> MatMul`` is MatMulIntegerToFloat (FP32 out).

The layers with weights that get quantizers (``layer_kind``): convolutions (``conv``) and
linear maps (``linear``): ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's projections, a
Linear with its weight stored transposed; ``engine.capture.conv1d``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from workbench.engine.capture.conv1d import is_conv1d

QUANTIZED_OUTPUT, CLAMP, KEEPS_GRID, FLOAT = "quantized output", "clamp", "keeps grid", "float"
FLOAT_FEEDING_GRID = "float, quantized output when read by an op that needs grid inputs"


@dataclass(frozen=True)
class OpKind:
    """What one kind of op needs around it and what ONNX Runtime runs it as."""

    name: str
    output: str  # QUANTIZED_OUTPUT, CLAMP, KEEPS_GRID or FLOAT
    kernel: str  # the ONNX Runtime kernel when quantized ("" when none)
    onnx_ops: tuple[str, ...] = ()  # the op types it exports as
    grid_inputs: bool = False  # quantized only when every input is already on a grid
    tensor_inputs: int = 0  # exact number of tensor inputs required (0: any)
    quantized_inputs: bool = False  # each input quantized (config.quantize_attention_matmuls)


CONV = OpKind("conv", QUANTIZED_OUTPUT, "QLinearConv", ("Conv",))
LINEAR = OpKind("linear", FLOAT, "QGemm / MatMulIntegerToFloat", ("MatMul", "Gemm"))
ADD = OpKind("add", QUANTIZED_OUTPUT, "QLinearAdd", ("Add",), grid_inputs=True, tensor_inputs=2)
CONCAT = OpKind("concat", QUANTIZED_OUTPUT, "QLinearConcat", ("Concat",), grid_inputs=True)
AVERAGE_POOL = OpKind(
    "average pool",
    QUANTIZED_OUTPUT,
    "QLinearAveragePool / QLinearGlobalAveragePool",
    ("AveragePool", "GlobalAveragePool"),
    grid_inputs=True,
    tensor_inputs=1,
)
MUL = OpKind("mul", QUANTIZED_OUTPUT, "QLinearMul", ("Mul",), grid_inputs=True, tensor_inputs=2)
MATMUL = OpKind(
    "matmul",
    FLOAT,
    "MatMulIntegerToFloat",
    ("MatMul",),
    tensor_inputs=2,
    quantized_inputs=True,
)
RELU = OpKind("relu", CLAMP, "", ("Relu", "Clip"))
ACTIVATION = OpKind("activation", FLOAT_FEEDING_GRID, "")
MAX_POOL = OpKind("max pool", KEEPS_GRID, "MaxPool (uint8)", ("MaxPool",))
RESHAPE = OpKind("reshape", KEEPS_GRID, "", ("Flatten", "Reshape", "Transpose", "Squeeze"))
OTHER = OpKind("other", FLOAT, "")

MODULE_KINDS: tuple[tuple[tuple[type[nn.Module], ...], OpKind], ...] = (
    ((nn.ReLU, nn.ReLU6), RELU),
    ((nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid), ACTIVATION),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), MAX_POOL),
    ((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), MAX_POOL),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), AVERAGE_POOL),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), AVERAGE_POOL),
    ((nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout), RESHAPE),
)
FUNCTION_KINDS: dict[str, OpKind] = {
    **dict.fromkeys(("add", "add_", "__add__", "__radd__", "__iadd__"), ADD),
    **dict.fromkeys(("cat", "concat", "concatenate"), CONCAT),
    **dict.fromkeys(("mul", "mul_", "__mul__", "__rmul__", "__imul__"), MUL),
    **dict.fromkeys(("hardswish", "hardsigmoid", "silu", "sigmoid"), ACTIVATION),
    **dict.fromkeys(("relu", "relu_", "relu6"), RELU),
    **dict.fromkeys(("matmul", "__matmul__", "bmm"), MATMUL),
    **dict.fromkeys(
        (
            "avg_pool1d",
            "avg_pool2d",
            "avg_pool3d",
            "adaptive_avg_pool1d",
            "adaptive_avg_pool2d",
            "adaptive_avg_pool3d",
        ),
        AVERAGE_POOL,
    ),
    **dict.fromkeys(
        (
            "max_pool1d",
            "max_pool2d",
            "max_pool3d",
            "_max_pool1d",
            "_max_pool2d",
            "_max_pool3d",
            "adaptive_max_pool1d",
            "adaptive_max_pool2d",
            "adaptive_max_pool3d",
        ),
        MAX_POOL,
    ),
    **dict.fromkeys(
        (
            "flatten",
            "reshape",
            "view",
            "permute",
            "transpose",
            "contiguous",
            "squeeze",
            "unsqueeze",
            "dropout",
            "clone",
        ),
        RESHAPE,
    ),
}
HARDTANH_FUNCTIONS = ("hardtanh", "hardtanh_")
# the layers that hold a quantized weight (transformers' Conv1D is matched by engine.capture.conv1d)
LAYER_KINDS: tuple[tuple[tuple[type[nn.Module], ...], OpKind], ...] = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), CONV),
    ((nn.Linear,), LINEAR),
)
LAYER_TYPE_NAMES = "Linear, Conv1d, Conv2d, Conv3d, transformers' Conv1D"


def layer_kind(module: nn.Module) -> OpKind | None:
    """``CONV`` or ``LINEAR`` for a layer whose weight is quantized, None for any other module."""
    for types, kind in LAYER_KINDS:
        if isinstance(module, types):
            return kind
    return LINEAR if is_conv1d(module) else None


def module_kind(module: nn.Module) -> OpKind:
    """The kind of a leaf module call (quantized layers are classified by the caller)."""
    if isinstance(module, nn.Hardtanh) and float(module.min_val) == 0.0:
        return RELU  # ReLU6 is a Hardtanh(0, 6)
    for types, kind in MODULE_KINDS:
        if isinstance(module, types):
            return kind
    return OTHER


def function_kind(name: str, args: tuple = (), kwargs: dict | None = None) -> OpKind:
    """The kind of a tensor op called ``name`` with these (non-tensor) arguments."""
    if name in HARDTANH_FUNCTIONS:
        low = (kwargs or {}).get("min_val", args[1] if len(args) > 1 else -1.0)
        return RELU if isinstance(low, int | float) and float(low) == 0.0 else OTHER
    return FUNCTION_KINDS.get(name, OTHER)
