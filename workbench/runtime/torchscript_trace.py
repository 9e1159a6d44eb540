"""The TorchScript exporter's graph of a model: inputs named, outputs flattened, dynamic batch
and sequence axes, the exporter's errors turned into one ``ExportError``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from workbench.atomic_file import temporary_path_beside
from workbench.engine.capture.training_modes import training_modes_kept
from workbench.errors import ExportError, WorkbenchError, first_line
from workbench.runtime.export_errors import export_error
from workbench.runtime.export_guard import EXPORT_LOCK
from workbench.runtime.export_inputs import Positional, export_inputs, flatten_outputs, input_names
from workbench.runtime.kv_cache import kv_cache_off
from workbench.runtime.per_call_specs import spec_copies_per_call

# no shape depends on the values of a parameter this large (shapes, axes and indices are small)
SHAPE_INFERENCE_PARAMETER_ELEMENTS = 1 << 20


@contextmanager
def large_parameters_kept_from_shape_inference() -> Iterator[None]:
    """While a model whose parameters are graph inputs is exported (the large-model export),
    torch's ONNX shape inference is given only the values of its small parameters: given a
    large one, it copies it into a one-node ONNX model to infer that node's output type
    (measured: 0.5 GiB above the steady state for a 32000 x 2048 embedding table). The type and
    shape of a large parameter still come from its graph input."""
    infer = torch._C._jit_pass_onnx_graph_shape_type_inference

    def small_values_only(graph, params_dict, opset):
        small = {
            name: value
            for name, value in params_dict.items()
            if not (
                isinstance(value, torch.Tensor)
                and value.numel() >= SHAPE_INFERENCE_PARAMETER_ELEMENTS
            )
        }
        return infer(graph, small, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = small_values_only
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = infer


def torch_export(
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
        wrapper = Positional(model, len(args), list(kwargs)).eval()
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
            values_kept = (
                nullcontext() if with_weights else large_parameters_kept_from_shape_inference()
            )
            with EXPORT_LOCK, warnings.catch_warnings(), values_kept:  # global exporter state
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
            raise export_error(exc, what, model, values, len(args), list(kwargs), opset) from exc


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


def exported_proto(
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
        torch_export(model, example_input, raw, dynamic_batch, opset, what, with_weights)
        proto = onnx.load(str(raw))
    proto.producer_name = "workbench"
    return proto
