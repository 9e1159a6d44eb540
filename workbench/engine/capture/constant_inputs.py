"""Layers whose input does not depend on the model's inputs.

DeBERTa-v2 projects its relative position embeddings (a LayerNorm of a weight table) with
``pos_key_proj`` / ``pos_query_proj``: the input of those Linears is the same for every batch,
computed from weights only. ONNX Runtime folds such a layer's quantized input into a constant
and runs the layer as a weight-only kernel on it (or folds it entirely): there is no activation
to run on an integer kernel. Such layers are kept FP32 with that reason.

One forward on a batch marks every tensor computed from the batch's tensors (through any torch
function or tensor method, ``__torch_function__``); a layer whose input is not marked has a
constant input.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from workbench.engine.calibration.batches import model_inputs, output_tensor
from workbench.engine.capture.modules import get_layer, hooks_removed

CONSTANT_INPUT_NOTE = (
    "its input does not depend on the model's inputs (computed from weights only, as "
    "DeBERTa's relative position embeddings): ONNX Runtime folds it into a constant, leaving "
    "no activation for an integer kernel; kept FP32"
)


class _InputDerived(TorchFunctionMode):
    """Records, by identity, every tensor that a torch op computed from a marked tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    def mark(self, tree: Any) -> None:
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                self.tensors[id(leaf)] = leaf

    def derived(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and self.tensors.get(id(tensor)) is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(self.derived(leaf) for leaf in tree_flatten((args, kwargs))[0]):
            self.mark(out)
        return out


def layers_with_constant_input(
    model: nn.Module, batch: Any, names: list[str]
) -> tuple[set[str], torch.Tensor | None]:
    """The layers of ``names`` whose input, on ``batch``, was computed from weights only, and
    the model's main output on ``batch`` (None when it has none or does not run)."""
    args, kwargs = model_inputs(batch, model)
    mode = _InputDerived()
    mode.mark((args, kwargs))
    constant: set[str] = set()
    variable: set[str] = set()  # a layer called several times is constant only if every call is

    def hook_for(name: str):
        def hook(module, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor) and not mode.derived(inputs[0]):
                constant.add(name)
            else:
                variable.add(name)

        return hook

    handles = [get_layer(model, name).register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        with hooks_removed(handles), torch.no_grad(), mode:
            output = model(*args, **kwargs)
    except Exception:  # the calibration that follows reports a model that does not run
        return set(), None
    return constant - variable, output_tensor(output)
