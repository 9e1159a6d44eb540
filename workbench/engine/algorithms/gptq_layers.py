"""GPTQ's view of one layer: its weight as a matrix, the Hessian of its inputs, and the
weight quantizer that holds the codes GPTQ chose (``gptq`` walks the model with them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.core.weight_codes import WeightCodes, pack_codes
from workbench.engine.algorithms.gptq_solver import GPTQCodes
from workbench.engine.placement.layers import QuantizedEmbedding, QuantizedLayer
from workbench.engine.quantizers.modules import (
    BLOCKED_LINEAR_ELEMENTS,
    WeightQuantizer,
    linear_from_codes,
)


def supports_gptq(layer: QuantizedLayer) -> bool:
    """Linear (GPT-2's ``Conv1D`` among them: the engine holds each as the Linear it
    computes, ``engine.capture.conv1d``) and Conv1d / Conv2d with one group and numeric padding."""
    if isinstance(layer, QuantizedEmbedding):
        return False
    module = layer.layer
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    return False


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a conv's input = channels x kernel, as ``unfold`` lays
    out its patches)."""
    weight = module.weight.detach()
    return weight.reshape(weight.shape[0], -1)


def from_matrix(matrix: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``weight_matrix``'s inverse: a ``[out, in]`` matrix in the module's weight layout."""
    return matrix.reshape(module.weight.shape)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``[n, in]`` rows, one per output position (``W x`` for each)."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, dilation = (1, module.kernel_size[0]), (1, module.dilation[0])
        padding, stride = (0, module.padding[0]), (1, module.stride[0])
    elif isinstance(module, nn.Conv2d):
        kernel, dilation = module.kernel_size, module.dilation
        padding, stride = module.padding, module.stride
    else:
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3:  # an unbatched conv input
        x = x.unsqueeze(0)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class HessianAccumulator:
    """``H = 2 X X^T / n`` over every input row the layer sees."""

    def __init__(self, columns: int) -> None:
        self.sum = torch.zeros(columns, columns, dtype=torch.float32)
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float32)
        self.sum += rows.t() @ rows
        self.rows += rows.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return 2.0 * self.sum / max(self.rows, 1)


class GPTQWeightQuantizer(WeightQuantizer):
    """A frozen weight quantizer holding the codes GPTQ chose.

    ``codes`` has the weight's layout; ``scale`` / ``zero_point`` are the layer's own qparams
    (0-d or one per output channel) without block-wise scales, or ``[out, groups]`` with them.
    The forward pass returns ``s * (q - z)`` whatever weight it is given: GPTQ's codes are
    not a rounding of the FP32 weight. The codes are kept packed (``core.weight_codes``: two
    4-bit codes per byte), not as a dequantized FP32 copy of the weight.
    """

    def __init__(self, base: WeightQuantizer, module: nn.Module, result: GPTQCodes) -> None:
        super().__init__(base.scheme, base.observer_name, base.tensor_name)
        self.enabled = base.enabled
        self.frozen = True
        self.group_size = result.group_size
        if result.group_size is None:
            self.scale = base.scale.detach().clone()
            self.zero_point = base.zero_point.detach().clone()
        else:
            self.scale = result.scale.clone()
            self.zero_point = result.zero_point.clone()
        codes = from_matrix(result.codes, module)
        self.register_buffer("packed_codes", pack_codes(codes, self.scheme))
        self.codes_shape = codes.shape
        # while the block walk runs this layer's block again (the next groups' Hessians, the
        # block's outputs) its dequantized weight is kept, not unpacked on every pass
        self.kept_dequantized: torch.Tensor | None = None

    def gptq_codes(self) -> WeightCodes:
        """GPTQ's codes with this quantizer's qparams."""
        return WeightCodes(
            self.packed_codes, self.scale, self.zero_point, self.scheme, self.codes_shape
        )

    def codes_of(self, weight: torch.Tensor) -> WeightCodes:
        return self.gptq_codes()

    def exact_codes(self, weight: torch.Tensor) -> WeightCodes | None:
        return self.gptq_codes() if self.enabled else None

    @property
    def codes(self) -> torch.Tensor:
        """The integer codes, in the weight's layout."""
        return self.gptq_codes().codes()

    @property
    def dequantized(self) -> torch.Tensor:
        return self.gptq_codes().dequantize()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.kept_dequantized is not None:
            return self.kept_dequantized.to(weight.dtype)
        return self.dequantized.to(weight.dtype)

    def linear_in_blocks(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """As the base class: a large Linear (an LM head) computed from the codes one block of
        output rows at a time, never dequantizing the whole weight."""
        if weight.numel() < BLOCKED_LINEAR_ELEMENTS or not self.enabled:
            return None
        if self.kept_dequantized is not None:
            return None  # the plain path reads the kept weight
        if torch.is_grad_enabled() or weight.dtype != torch.float32:
            return None
        return linear_from_codes(x, self.gptq_codes(), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rounding=gptq"
