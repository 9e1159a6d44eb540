"""INT8 QDQ ONNX export that ONNX Runtime runs on integer kernels, and the FP32 export beside it.

How, and why this way:

* **TorchScript exporter of the simulated model, with export-time stand-ins.** The simulated
  model (``result.model``) is copied and its quantizers and quantized layers are replaced by
  modules whose torch forward is the simulation's own computation and whose ONNX ``symbolic``
  writes the QDQ nodes we choose (``qdq_modules``). The graph therefore contains exactly the
  quantizers the simulation has, with the same scales and zero points, and no others. The
  dynamo exporter cannot export fake-quant ops at all, and the TorchScript exporter's own
  mapping of ``fake_quantize_*`` only accepts the ranges (0, 255), (-128, 127), (0, 127)
  (no 4-bit weights) and keeps the FP32 weight behind a Q/DQ pair (no size gain).
* **Weights as INT8 initializers feeding DequantizeLinear directly.** 4x smaller files, and the
  pattern ONNX Runtime matches. A Linear becomes ``DQ(W^T, axis=1) -> MatMul`` (the int8 weight
  is stored transposed: a Transpose between DQ and MatMul blocks the fusion, and such graphs
  run slower than FP32). Per-channel 4-bit weights are stored as int8 codes within the 4-bit
  range (ONNX Runtime's integer conv / matmul kernels read int8, and int4 initializers need
  opset 21, past the TorchScript exporter's 20). Block-wise (``group_size``) Linear weights
  are stored packed, 2 / 4 / 8 bits per code, in ONNX Runtime's ``MatMulNBits``
  (``blockwise_export``).
* **uint8 activations, int8 weights (U8S8),** what ONNX Runtime's x86 kernels (VNNI / AMX)
  run fastest; ``DQ -> MatMul`` becomes MatMulIntegerToFloat (FP32 out, bias added in FP32).
* **Conv needs DQ -> Conv -> Q** for QLinearConv, with an INT32 bias on the grid of
  ``s_x * s_w``; the engine places the output quantizers (after a lone ReLU, whose zero point
  0 lets ONNX Runtime drop it) and rounds the bias, so the simulation computes the same thing
  (``engine.placement.graph_quantizers``). ``qdq_graph`` then moves DQs past MaxPool / Flatten /
  Reshape and removes requantizations that are identities, so the residual adds of a ResNet
  see ``DQ, DQ -> Add -> Q`` (QLinearAdd).
* **For CPUs with AMX-INT8, ``amx=True`` stores conv weights with zero point -1** (codes
  shifted by -1, the same values): ONNX Runtime then runs the convs on its AMX GEMM instead of
  its symmetric-weight VNNI kernels, 1.4-1.9x faster for convs with 128+ channels there. The
  default is ``amx=False`` so that the file does not depend on the CPU that exported it;
  ``amx="auto"`` follows this machine's CPU.
* **Atomic write.** The exporter writes into a temporary file in the target directory, the
  rewritten graph is saved into another, and ``os.replace`` moves it into place: a failed
  export leaves no file (and an existing file untouched). Errors name the op and, when it can
  be found, the module that uses it.
* Layers kept FP32 stay FP32 (plain MatMul / Conv with float weights). A weight-only Linear is
  ``DQ(W^T) -> MatMul`` with an FP32 input; ONNX Runtime makes it MatMulNBits, which quantizes
  the activation on the fly (its ``accuracy_level`` 4), so there the parity check shows a
  small difference that the graph itself does not have.
* An image stem (a strided conv on 3 channels) reads a space-to-depth view of its uint8 input
  (``qdq_graph.space_to_depth_stem``): the same integers, a faster integer kernel.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.atomic_file import atomic_path
from workbench.engine.capture.modules import find_submodule, tensor_bytes
from workbench.engine.placement.layers import QuantizedLayer, iter_quantized_layers
from workbench.errors import ExportError, first_line
from workbench.runtime import external_data as external_data_module
from workbench.runtime.blockwise_export import DEFAULT_ACCURACY_LEVEL, check_accuracy_level
from workbench.runtime.blockwise_specs import BlockwiseSpec, blockwise_arrays
from workbench.runtime.cpu_features import detect_cpu_features
from workbench.runtime.export_guard import DEFAULT_OPSET
from workbench.runtime.external_data import (
    external_data_files,
    fill_placeholders,
    materialize_inputs,
    save_graph,
)
from workbench.runtime.graph_info import GraphInfo
from workbench.runtime.qdq_graph import finalize_qdq_graph
from workbench.runtime.qdq_modules import exportable_model
from workbench.runtime.torchscript_trace import exported_proto


def _save_atomically(proto: onnx.ModelProto, path: Path) -> None:
    with atomic_path(path, ".onnx") as temporary:
        try:
            onnx.save(proto, str(temporary))
        except ValueError as exc:  # protobuf's 2 GB limit ("Message ... exceeds maximum")
            raise ExportError(
                f"the ONNX model is too large for one file ({first_line(exc)}); pass "
                "external_data=True to write its tensors to a .data file beside it"
            ) from exc


def uses_external_data(model: nn.Module, external_data: bool | None) -> bool:
    """Whether the export writes ``model`` with external data: asked for, or (None) when its
    tensors reach ``external_data.EXTERNAL_DATA_BYTES`` (2 GiB)."""
    if external_data is None:
        return tensor_bytes(model) >= external_data_module.EXTERNAL_DATA_BYTES
    if not isinstance(external_data, bool):
        raise ExportError(f"external_data must be True, False or None, got {external_data!r}")
    return external_data


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by the names the traced graph's inputs have (``_Positional``
    holds the model as ``model``), every alias of a shared tensor included."""
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    return {f"model.{name}": tensor for name, tensor in named}


_PLACEHOLDER = re.compile(
    r"^(?P<layer>.+?)(#\d+)?\.(?P<key>weight_quantized|weight_scale|weight_zero_point)$"
)


def _save_with_external_data(
    proto: onnx.ModelProto,
    target: Path,
    tensors: dict[str, torch.Tensor],
    deferred: dict[str, QuantizedLayer] | None = None,
    progress: bool = False,
) -> None:
    """Write ``proto`` (traced without its weights) as ``target`` + ``target.data``: its
    parameters from ``tensors``, the stored weights of the ``deferred`` layers computed one
    layer at a time (a progress bar per layer when ``progress``), every other large
    initializer moved out; atomically."""
    deferred = deferred or {}

    def owner_of(name: str) -> tuple[str, str] | None:
        match = _PLACEHOLDER.match(name)
        if match is None or match.group("layer") not in deferred:
            return None
        return match.group("layer"), match.group("key")

    bar = tqdm(total=len(deferred), desc="export (layers)", unit="layer", disable=not progress)

    def arrays_of(layer_name: str):
        bar.update(1)
        return blockwise_arrays(deferred[layer_name])

    with external_data_files(target) as (temporary, writer), bar:
        materialize_inputs(proto.graph, tensors, writer)
        fill_placeholders(proto.graph, arrays_of, writer, owner_of)
        writer.move_out(proto.graph)
        save_graph(proto, temporary)


def _target(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{str(path)!r} is a directory; pass a file path such as model.onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def export_int8_onnx(
    quantized_model: nn.Module,
    path: str | os.PathLike,
    example_input: Any,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    amx: bool | str = False,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    external_data: bool | None = None,
    progress: bool = False,
) -> tuple[Path, GraphInfo]:
    """Write the simulated ``quantized_model`` as an INT8 QDQ ONNX model (atomically).

    ``amx``: store conv weights for ONNX Runtime's AMX GEMM (``qdq_graph.route_convs_to_qgemm``;
    same values, faster on CPUs with AMX-INT8, equal elsewhere). Default ``False``: the file
    does not depend on the CPU that exports it; ``"auto"`` = when this machine's CPU has
    AMX-INT8. ``accuracy_level``: of the MatMulNBits nodes block-wise Linear layers export to
    (4 = int8 compute, ONNX Runtime's fastest; 1 = FP32 compute, closest to the simulation).
    ``external_data``: write the tensors to ``path.data`` beside the graph (``external_data``
    module), streaming them layer by layer; None (default): when the model's tensors reach
    2 GiB; ``progress``: then a progress bar per layer written. Returns the path and the map
    of quantized layers / output quantizers in the graph.
    """
    check_accuracy_level(accuracy_level)
    if amx == "auto":
        amx = detect_cpu_features().amx
    elif not isinstance(amx, bool):
        raise ExportError(f"amx must be True, False or 'auto', got {amx!r}")
    target = _target(path)
    large = uses_external_data(quantized_model, external_data)
    stand_in = exportable_model(quantized_model, deferred=large).eval()
    proto = exported_proto(
        stand_in, example_input, target, dynamic_batch, opset, "the quantized model", not large
    )
    try:
        info = finalize_qdq_graph(proto, amx=amx, accuracy_level=accuracy_level)
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ExportError(
            f"the exported INT8 graph is not valid ONNX ({exc}); export the FP32 model with "
            "export_fp32_onnx and report this model"
        ) from exc
    if large:
        deferred = {
            name: layer
            for name, layer in iter_quantized_layers(quantized_model)
            if isinstance(getattr(find_submodule(stand_in, name), "spec", None), BlockwiseSpec)
        }
        tensors = _named_tensors(stand_in)
        del stand_in
        _save_with_external_data(proto, target, tensors, deferred, progress)
    else:
        _save_atomically(proto, target)
    return target, info


def export_fp32_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Any,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` (FP32) as ONNX with the same exporter settings as the INT8 export;
    ``external_data`` as for :func:`export_int8_onnx` (a model of 2 GiB or more: a ``.data``
    file beside the graph, its parameters streamed into it)."""
    target = _target(path)
    large = uses_external_data(model, external_data)
    proto = exported_proto(
        model, example_input, target, dynamic_batch, opset, "the FP32 model", not large
    )
    if large:
        _save_with_external_data(proto, target, _named_tensors(model))
    else:
        _save_atomically(proto, target)
    return target
