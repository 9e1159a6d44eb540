"""Conv rewrites of the QDQ graph pass (``qdq_graph.finalize_qdq_graph``): a strided image stem
as space-to-depth + stride-1 conv (:func:`space_to_depth_stem`), and convs' int8 weights routed
to ONNX Runtime's AMX GEMM (:func:`route_convs_to_qgemm`). Both give the same integers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from workbench.runtime.qdq_index import GraphIndex, conv_attrs, per_tensor_dq, unique_name


def space_to_depth_stem(
    model: onnx.ModelProto, g: GraphIndex, max_channels: int = 16, max_kernel_growth: float = 1.5
) -> bool:
    """Rewrite a strided quantized conv with few input channels (an image stem: 3 channels,
    7x7, stride 2) as a space-to-depth rearrangement of its uint8 input and a stride-1 conv.

    ``Conv(x, W, stride s)`` equals ``Conv(S2D_s(pad(x)), W', stride 1)`` where ``W`` is padded
    with zeros to a multiple of ``s`` and rearranged the same way: the same products are summed,
    so QLinearConv's integer result is identical. Integer convs with 3 input channels waste most
    of their vector width; with ``3 * s * s`` channels the stem can run faster. The padded
    kernel adds multiplications by zero: a stem is rewritten only when its kernel area grows at
    most ``max_kernel_growth`` times (7x7 stride 2 -> 8x8: 1.31x; 3x3 stride 2 -> 4x4: 1.78x,
    measured 1.5x slower than the plain QLinearConv on an AVX2 CPU, and MobileNetV2 5-10%
    slower as a whole).
    """
    strided = [
        n
        for n in g.graph.node
        if n.op_type == "Conv" and any(v > 1 for v in conv_attrs(n).get("strides", [1]))
    ]
    if not strided:
        return False
    shapes = {}
    inferred = onnx.shape_inference.infer_shapes(model)
    for value in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    changed = False
    for conv in strided:
        stem = _stem_geometry(g, conv, shapes, max_channels, max_kernel_growth)
        if stem is not None:
            _rewrite_stem(g, conv, stem)
            changed = True
    return changed


@dataclass
class _Stem:
    """A stem conv's geometry: its input DequantizeLinear and weight, the stride, kernel and
    pads, the input size, and the padded kernel / input lengths the rearrangement needs."""

    x_dq: onnx.NodeProto
    w_dq: onnx.NodeProto
    weight: np.ndarray
    stride: int
    kernel: list[int]
    pads: list[int]
    channels: int
    new_kernel: list[int]
    lengths: list[int]
    ends: list[int]


def _stem_geometry(
    g: GraphIndex, conv: onnx.NodeProto, shapes: dict, max_channels: int, growth: float
) -> _Stem | None:
    """The geometry of ``conv`` when it is a stem worth rewriting, else None."""
    attrs = conv_attrs(conv)
    strides = list(attrs.get("strides", [1, 1]))
    kernel = list(attrs.get("kernel_shape", []))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    plain = attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    if len(kernel) != 2 or attrs.get("group", 1) != 1 or not plain:
        return None
    if any(d != 1 for d in attrs.get("dilations", [1, 1])) or strides[0] != strides[1]:
        return None
    stride = strides[0]
    x_dq, w_dq = per_tensor_dq(g, conv.input[0]), g.producer.get(conv.input[1])
    if stride < 2 or x_dq is None or w_dq is None or w_dq.op_type != "DequantizeLinear":
        return None
    weight = g.array(w_dq.input[0])
    shape = shapes.get(x_dq.input[0])
    if weight is None or weight.ndim != 4 or not shape or len(shape) != 4:
        return None
    channels, height, width = shape[1], shape[2], shape[3]
    if None in (channels, height, width) or channels * stride * stride > max_channels:
        return None
    new_kernel = [-(-k // stride) * stride for k in kernel]
    if new_kernel[0] * new_kernel[1] > growth * kernel[0] * kernel[1]:
        return None
    outs = [
        (size + pads[i] + pads[i + 2] - kernel[i]) // stride + 1
        for i, size in enumerate((height, width))
    ]
    lengths = [stride * (o - 1) + k for o, k in zip(outs, new_kernel, strict=True)]
    ends = [
        length - size - pads[i]
        for i, (length, size) in enumerate(zip(lengths, (height, width), strict=True))
    ]
    if any(e < 0 for e in ends):
        return None
    return _Stem(x_dq, w_dq, weight, stride, kernel, pads, channels, new_kernel, lengths, ends)


def _rewrite_stem(g: GraphIndex, conv: onnx.NodeProto, stem: _Stem) -> None:
    """Rearrange the weight, put Pad -> Reshape -> Transpose -> Reshape -> DQ before the conv
    and make it a stride-1 conv."""
    stride, channels, lengths = stem.stride, stem.channels, stem.lengths
    out_channels, kernel = stem.weight.shape[0], stem.kernel
    padded = np.zeros((out_channels, channels, *stem.new_kernel), dtype=stem.weight.dtype)
    padded[:, :, : kernel[0], : kernel[1]] = stem.weight
    blocks = [k // stride for k in stem.new_kernel]
    rearranged = (
        padded.reshape(out_channels, channels, blocks[0], stride, blocks[1], stride)
        .transpose(0, 1, 3, 5, 2, 4)
        .reshape(out_channels, channels * stride * stride, *blocks)
    )
    weight_name = stem.w_dq.input[0]
    g.initializers[weight_name].CopyFrom(
        numpy_helper.from_array(np.ascontiguousarray(rearranged), weight_name)
    )
    base = conv.name or conv.output[0]
    names = {
        key: unique_name(g, f"{base}/space_to_depth_{key}")
        for key in ("pads", "padded", "shape1", "split", "moved", "shape2", "codes", "input")
    }
    pads, ends = stem.pads, stem.ends
    constants = {
        "pads": [0, 0, pads[0], pads[1], 0, 0, ends[0], ends[1]],
        "shape1": [0, channels, lengths[0] // stride, stride, lengths[1] // stride, stride],
        "shape2": [0, channels * stride * stride, lengths[0] // stride, lengths[1] // stride],
    }
    g.graph.initializer.extend(
        numpy_helper.from_array(np.array(values, np.int64), names[key])
        for key, values in constants.items()
    )
    x_dq = stem.x_dq
    zero = x_dq.input[2] if len(x_dq.input) > 2 else ""
    nodes = [
        helper.make_node("Pad", [x_dq.input[0], names["pads"], zero], [names["padded"]]),
        helper.make_node("Reshape", [names["padded"], names["shape1"]], [names["split"]]),
        helper.make_node("Transpose", [names["split"]], [names["moved"]], perm=[0, 1, 3, 5, 2, 4]),
        helper.make_node("Reshape", [names["moved"], names["shape2"]], [names["codes"]]),
        helper.make_node("DequantizeLinear", [names["codes"], *x_dq.input[1:]], [names["input"]]),
    ]
    position = list(g.graph.node).index(conv)
    for offset, node in enumerate(nodes):
        g.graph.node.insert(position + offset, node)
    conv.input[0] = names["input"]
    del conv.attribute[:]
    conv.attribute.extend(
        [
            helper.make_attribute("kernel_shape", blocks),
            helper.make_attribute("strides", [1, 1]),
            helper.make_attribute("pads", [0, 0, 0, 0]),
            helper.make_attribute("dilations", [1, 1]),
            helper.make_attribute("group", 1),
        ]
    )
    g.refresh()


def route_convs_to_qgemm(g: GraphIndex) -> int:
    """Store each (non-grouped) quantized conv's symmetric int8 weight with zero point -1 and
    codes shifted by -1: ``(q - 1) - (-1) = q``, the same values and the same integer sums.

    ONNX Runtime runs a conv whose weight zero point is 0 on its symmetric-weight kernels
    (AVX512-VNNI) and any other on its general QGEMM, which uses AMX tiles where the CPU has
    them: on an AMX CPU, convs with 128+ channels ran 1.4-1.9x faster this way (equal below).
    Only applied when every code is above -128. Returns the number of convs rewritten.
    """
    count = 0
    for conv in [n for n in g.graph.node if n.op_type == "Conv" and len(n.input) >= 2]:
        if conv_attrs(conv).get("group", 1) != 1:
            continue
        dq = g.producer.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        codes, zero = g.array(dq.input[0]), g.array(dq.input[2])
        if codes is None or zero is None or codes.dtype != np.int8 or codes.min() <= -128:
            continue
        if zero.dtype != np.int8 or np.any(zero != 0):
            continue
        shifted = (codes.astype(np.int16) - 1).astype(np.int8)
        g.initializers[dq.input[0]].CopyFrom(numpy_helper.from_array(shifted, dq.input[0]))
        g.initializers[dq.input[2]].CopyFrom(
            numpy_helper.from_array(np.full_like(zero, -1), dq.input[2])
        )
        count += 1
    g.refresh()
    return count
