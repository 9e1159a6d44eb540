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
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from workbench.atomic_file import atomic_path, temporary_path_beside
from workbench.engine.calibration.batches import model_inputs
from workbench.engine.capture.modules import find_submodule, tensor_bytes
from workbench.engine.capture.training_modes import training_modes_kept
from workbench.engine.placement.layers import QuantizedLayer, iter_quantized_layers
from workbench.errors import ExportError, WorkbenchError, first_line
from workbench.runtime import external_data as external_data_module
from workbench.runtime.blockwise_export import (
    DEFAULT_ACCURACY_LEVEL,
    BlockwiseSpec,
    blockwise_arrays,
    check_accuracy_level,
)
from workbench.runtime.cpu_features import detect_cpu_features
from workbench.runtime.export_guard import EXPORT_LOCK
from workbench.runtime.external_data import (
    external_data_files,
    fill_placeholders,
    materialize_inputs,
    save_graph,
)
from workbench.runtime.graph_info import GraphInfo
from workbench.runtime.kv_cache import kv_cache_off
from workbench.runtime.per_call_specs import spec_copies_per_call
from workbench.runtime.qdq_graph import finalize_qdq_graph
from workbench.runtime.qdq_modules import exportable_model

DEFAULT_OPSET = 17


# inputs and outputs --------------------------------------------------------------------------
def flatten_outputs(output: Any, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of a model output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [(prefix, output)]
    items: list[tuple[str, Any]]
    if isinstance(output, dict) or hasattr(output, "keys"):
        items = [(str(key), output[key]) for key in output.keys()]  # noqa: SIM118
    elif isinstance(output, list | tuple):
        items = [(f"{prefix}_{i}", value) for i, value in enumerate(output)]
    else:
        return []
    flat: list[tuple[str, torch.Tensor]] = []
    for name, value in items:
        flat.extend(flatten_outputs(value, name))
    return flat


def export_inputs(example_input: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of an example input, read as ``torch.onnx.export`` reads it: a tensor
    is the one input, a dict the keyword inputs, a tuple / list the positional inputs (a dict
    as its last item: keyword inputs after them)."""
    if isinstance(example_input, list | tuple):
        items = list(example_input)
        kwargs = dict(items.pop()) if items and isinstance(items[-1], Mapping) else {}
        if not items and not kwargs:
            raise ExportError("example_input is an empty tuple; pass the model's input tensors")
        return tuple(items), kwargs
    return model_inputs(example_input)


def input_names(example_input: Any) -> tuple[tuple, list[str]]:
    """The positional tensors the exported graph takes, and their names."""
    args, kwargs = export_inputs(example_input)
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    names += list(kwargs)
    values = tuple(args) + tuple(kwargs.values())
    for name, value in zip(names, values, strict=True):
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"example input {name!r} is a {type(value).__name__}, not a tensor; pass tensors "
                "(or a dict of tensors) as example_input"
            )
    return values, names


class _Positional(nn.Module):
    """Calls ``model`` with the exported inputs and returns its output tensors as a tuple."""

    def __init__(self, model: nn.Module, arg_count: int, kwarg_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.arg_count = arg_count
        self.kwarg_names = kwarg_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = inputs[: self.arg_count]
        kwargs = dict(zip(self.kwarg_names, inputs[self.arg_count :], strict=True))
        return tuple(tensor for _, tensor in flatten_outputs(self.model(*args, **kwargs)))


# errors ----------------------------------------------------------------------------------------
class _OpFinder(TorchFunctionMode):
    """Finds the innermost module that calls an op, by running the model once."""

    def __init__(self, op_names: set[str], stack: list[str]) -> None:
        super().__init__()
        self.op_names = op_names
        self.stack = stack
        self.found: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "").strip("_")
        if self.found is None and name in self.op_names and self.stack:
            self.found = self.stack[-1]
        return func(*args, **(kwargs or {}))


def _module_calling(model: nn.Module, values: tuple, arg_count: int, kwarg_names, op: str):
    short = op.split("::")[-1].strip("_")
    candidates = {short, short.split("_", 1)[-1]}
    stack: list[str] = []
    handles = []

    def enter(name: str):
        def hook(module, args) -> None:
            stack.append(name)

        return hook

    def leave(module, args, output) -> None:
        stack.pop()

    for name, module in model.named_modules():
        label = name or f"{type(model).__name__} (the model's own forward)"
        handles.append(module.register_forward_pre_hook(enter(label)))
        handles.append(module.register_forward_hook(leave))
    finder = _OpFinder(candidates, stack)
    try:
        with torch.no_grad(), finder:
            _Positional(model, arg_count, kwarg_names)(*values)
    except Exception:
        return None
    finally:
        for handle in handles:
            handle.remove()
    return finder.found or None


def unsupported_op(wrapper: nn.Module, values: tuple, opset: int) -> str | None:
    """The first op (``aten::histc``) the TorchScript exporter cannot convert at ``opset``,
    as ``torch.onnx.utils.unconvertible_ops`` lists them (its UnsupportedOperatorError keeps
    the name only in its message); None when it lists none or cannot trace the model."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            _, ops = torch.onnx.utils.unconvertible_ops(wrapper, values, opset_version=opset)
    except Exception:
        return None
    return ops[0] if ops else None


def _export_error(
    exc: Exception, what: str, model: nn.Module, values, arg_count, kwarg_names, opset: int
):
    first = first_line(exc)
    op = unsupported_op(_Positional(model, arg_count, kwarg_names).eval(), values, opset)
    if op is None:
        return ExportError(
            f"could not export {what} to ONNX ({first}); make the model traceable with "
            "torch.jit.trace or exclude the module that fails"
        )
    module = _module_calling(model, values, arg_count, kwarg_names, op)
    where = f" used in module {module!r}" if module else ""
    return ExportError(
        f"could not export {what} to ONNX: op {op}{where} has no ONNX equivalent "
        f"({first}); rewrite that module with supported ops or leave it out of the export"
    )


# writing -------------------------------------------------------------------------------------
def _torch_export(
    model: nn.Module,
    example_input: Any,
    file: Path,
    dynamic_batch: bool,
    opset: int,
    what: str,
    with_weights: bool = True,
) -> None:
    """The TorchScript exporter's file of ``model``; without ``with_weights`` the parameters
    are graph inputs named after the state dict (``external_data``) and the file is small."""
    if dynamic_batch and is_transformers_model(model):
        example_input = _two_tokens_for_one(example_input)
    values, names = input_names(example_input)
    args, kwargs = export_inputs(example_input)
    # export runs it in eval mode, a decoder without its key/value cache
    with training_modes_kept(model), kv_cache_off(model):
        wrapper = _Positional(model, len(args), list(kwargs)).eval()
        try:
            with torch.no_grad(), spec_copies_per_call(model):
                outputs = flatten_outputs(model(*args, **kwargs))
        except WorkbenchError:
            raise
        except Exception as exc:  # the user's forward on the example input
            raise ExportError(
                f"example_input could not run through {what} ({type(exc).__name__}: "
                f"{first_line(exc)}); pass one tensor, a tuple of the forward's positional "
                "inputs, or a dict of keyword inputs"
            ) from exc
        if not outputs:
            raise ExportError(
                f"{what} returned no tensor; return a tensor, a tuple or a dict of them"
            )
        output_names: list[str] = []
        for name, _ in outputs:  # unique names, in order
            unique, index = name, 1
            while unique in output_names or unique in names:
                unique, index = f"{name}_{index}", index + 1
            output_names.append(unique)
        dynamic_axes = None
        if dynamic_batch:
            dynamic_axes = {
                name: {0: "batch"}
                for name, value in [*zip(names, values, strict=True), *outputs]
                if value.dim() > 0
            }
        if dynamic_batch and is_transformers_model(model):
            _add_sequence_axes(dynamic_axes, names, values, output_names, outputs)
        try:
            with EXPORT_LOCK, warnings.catch_warnings():  # the exporter's state is global
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper,
                    values,
                    str(file),
                    dynamo=False,
                    opset_version=opset,
                    do_constant_folding=with_weights,
                    export_params=with_weights,
                    keep_initializers_as_inputs=None if with_weights else True,
                    input_names=names,
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                )
        except ExportError:
            raise
        except Exception as exc:
            raise _export_error(exc, what, model, values, len(args), list(kwargs), opset) from exc


def is_transformers_model(model: nn.Module) -> bool:
    """A ``transformers`` model (its ``config`` has a ``model_type``), whose forward takes
    token sequences of any length."""
    return hasattr(getattr(model, "config", None), "model_type")


def _is_tokens(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point()


def _two_tokens_for_one(example_input: Any) -> Any:
    """A one-token example traced as two tokens (each token input repeated): ``transformers``'
    decoders take a one-token path whose trace bakes that length in (measured: an export traced
    on ``[1, 1]`` failed on ``[2, 5]`` in ONNX Runtime; traced on two or more tokens it ran any
    length). The graph is the same function; only the traced shapes differ."""
    if isinstance(example_input, dict):
        tokens = [v for v in example_input.values() if _is_tokens(v)]
        if tokens and all(v.shape[1] == 1 for v in tokens):
            return {k: v.repeat(1, 2) if _is_tokens(v) else v for k, v in example_input.items()}
        return example_input
    if _is_tokens(example_input) and example_input.shape[1] == 1:
        return example_input.repeat(1, 2)
    if isinstance(example_input, tuple):
        tokens = [v for v in example_input if _is_tokens(v)]
        if tokens and all(v.shape[1] == 1 for v in tokens):
            return tuple(v.repeat(1, 2) if _is_tokens(v) else v for v in example_input)
    return example_input


def _add_sequence_axes(axes: dict, names, values, output_names, outputs) -> None:
    """Axis 1 of every integer ``[N, S]`` input (ids, mask, positions) and of every output
    whose axis 1 has the same length ``S`` (logits, hidden states) named ``sequence``."""
    tokens = [
        (name, value)
        for name, value in zip(names, values, strict=True)
        if value.dim() == 2 and not value.dtype.is_floating_point
    ]
    if not tokens:
        return
    length = tokens[0][1].shape[1]
    for name, value in tokens:
        if value.shape[1] == length:
            axes[name][1] = "sequence"
    for name, (_, value) in zip(output_names, outputs, strict=True):
        if value.dim() >= 2 and value.shape[1] == length:
            axes[name][1] = "sequence"


def _exported_proto(
    model: nn.Module,
    example_input: Any,
    target: Path,
    dynamic_batch: bool,
    opset: int,
    what: str,
    with_weights: bool = True,
) -> onnx.ModelProto:
    """The TorchScript exporter's graph of ``model``, through a temporary file beside ``target``."""
    with temporary_path_beside(target, ".export") as raw:
        _torch_export(model, example_input, raw, dynamic_batch, opset, what, with_weights)
        proto = onnx.load(str(raw))
    proto.producer_name = "workbench"
    return proto


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
) -> None:
    """Write ``proto`` (traced without its weights) as ``target`` + ``target.data``: its
    parameters from ``tensors``, the stored weights of the ``deferred`` layers computed one
    layer at a time, every other large initializer moved out; atomically."""
    deferred = deferred or {}

    def owner_of(name: str) -> tuple[str, str] | None:
        match = _PLACEHOLDER.match(name)
        if match is None or match.group("layer") not in deferred:
            return None
        return match.group("layer"), match.group("key")

    def arrays_of(layer_name: str):
        return blockwise_arrays(deferred[layer_name])

    with external_data_files(target) as (temporary, writer):
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
) -> tuple[Path, GraphInfo]:
    """Write the simulated ``quantized_model`` as an INT8 QDQ ONNX model (atomically).

    ``amx``: store conv weights for ONNX Runtime's AMX GEMM (``qdq_graph.route_convs_to_qgemm``;
    same values, faster on CPUs with AMX-INT8, equal elsewhere). Default ``False``: the file
    does not depend on the CPU that exports it; ``"auto"`` = when this machine's CPU has
    AMX-INT8. ``accuracy_level``: of the MatMulNBits nodes block-wise Linear layers export to
    (4 = int8 compute, ONNX Runtime's fastest; 1 = FP32 compute, closest to the simulation).
    ``external_data``: write the tensors to ``path.data`` beside the graph (``external_data``
    module), streaming them layer by layer; None (default): when the model's tensors reach
    2 GiB. Returns the path and the map of quantized layers / output quantizers in the graph.
    """
    check_accuracy_level(accuracy_level)
    if amx == "auto":
        amx = detect_cpu_features().amx
    elif not isinstance(amx, bool):
        raise ExportError(f"amx must be True, False or 'auto', got {amx!r}")
    target = _target(path)
    large = uses_external_data(quantized_model, external_data)
    stand_in = exportable_model(quantized_model, deferred=large).eval()
    proto = _exported_proto(
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
        _save_with_external_data(proto, target, tensors, deferred)
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
    proto = _exported_proto(
        model, example_input, target, dynamic_batch, opset, "the FP32 model", not large
    )
    if large:
        _save_with_external_data(proto, target, _named_tensors(model))
    else:
        _save_atomically(proto, target)
    return target
