"""transformers' ``Conv1D`` (GPT-2's projections) quantized as the Linear it computes.

``Conv1D`` computes ``y = x @ W + b`` with ``W`` stored ``(in, out)``: an ``nn.Linear`` whose
weight is transposed. Its output features are axis 1 of its weight. Quantizing it as
``Conv1DLinear`` (an ``nn.Linear`` holding ``W^T``, shape ``(out, in)``) puts every
per-channel scale on an output feature, as for any Linear (the bias follows the same axis),
and the export stores ``W`` back in its ``(in, out)`` layout, which ``MatMul`` reads without
a Transpose. ``linearize_conv1d`` swaps them in the engine's copy of the model before anything
else runs, so BatchNorm folding, equalization, calibration, AdaRound, bias correction, QAT and
the export see a Linear; the reports still call the layer ``Conv1D``. The user's model keeps
its ``Conv1D``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from workbench.engine.capture.modules import set_submodule

CONV1D_MODULE = "transformers.pytorch_utils"


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers.pytorch_utils.Conv1D``. transformers is not
    imported for the check: no Conv1D can exist before it is."""
    conv1d = getattr(sys.modules.get(CONV1D_MODULE), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


class Conv1DLinear(nn.Linear):
    """A ``Conv1D`` as the ``nn.Linear`` it computes: ``weight`` is the Conv1D's transposed,
    ``(out_features, in_features)``; the bias is the Conv1D's own."""

    def __init__(self, conv1d: nn.Module) -> None:
        in_features, out_features = conv1d.weight.shape
        super().__init__(in_features, out_features, bias=False, device="meta")
        transposed = conv1d.weight.detach().t().contiguous()
        self.weight = nn.Parameter(transposed, requires_grad=conv1d.weight.requires_grad)
        self.bias = conv1d.bias  # Conv1D's bias has one value per output feature already

    def conv1d_weight(self) -> torch.Tensor:
        """The weight in Conv1D's layout ``(in, out)``."""
        return self.weight.t()


def layer_type_name(module: nn.Module) -> str:
    """The type the reports show: ``Conv1D`` for a ``Conv1DLinear``."""
    return "Conv1D" if isinstance(module, Conv1DLinear) else type(module).__name__


def linearize_conv1d(model: nn.Module) -> nn.Module:
    """Swap every Conv1D of ``model`` (a copy: it is changed in place) for its
    ``Conv1DLinear``; returns the model (a new object only when it is one Conv1D)."""
    if is_conv1d(model):
        return Conv1DLinear(model)
    for name, module in list(model.named_modules()):
        if name and is_conv1d(module):
            set_submodule(model, name, Conv1DLinear(module))
    return model
