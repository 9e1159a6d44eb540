"""GPTQ: weights rounded with second-order error feedback, layer by layer (Frantar et al. 2023,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Rounding each weight to its nearest grid point ignores that the layer's inputs are
correlated. GPTQ quantizes the columns of ``W`` (``[out, in]``) one at a time and moves the
rounding error of each column onto the columns not yet quantized, weighted by the inverse
Hessian of the layer's squared output error on the calibration inputs ``X`` (``[in, n]``):

    H = 2 X X^T / n,   H += damp * mean(diag H) * I                  (dampening)
    U = cholesky(H^-1)^T                                            (upper triangular)
    for each column j:  q_j = Q(w_j),  e_j = (w_j - q_j) / U_jj,  w_k -= e_j U_jk  (k > j)

The updates are applied lazily, ``BLOCK_SIZE`` columns at a time (the same result, fewer
memory passes). Inputs never seen (``H_jj = 0``, dead columns) get a zero weight. With
``act_order`` the columns are taken in order of decreasing ``H_jj`` and the permutation is
undone at the end. With block-wise (per-group) scales, a group's scale is computed from the
weights as updated when its first column is reached, as the reference code does; with
``act_order`` too, the group scales are fixed from the original weights first ("static
groups"), so that every group stays a contiguous run of input columns as the export needs.

Linear layers (GPT-2's ``Conv1D`` too: the engine holds it as its Linear) and one-group
Conv1d / Conv2d (their inputs unfolded into patches) are rounded; other layers keep
round-to-nearest. ``X`` is the layer's input in the quantized model, with the layers before
it already quantized (and rounded by GPTQ), after its input quantizer when activations are
quantized.
Only ``H`` is kept per layer (``in x in`` floats), never the inputs: memory is bounded by one
batch's activations. The codes are kept in a :class:`GPTQWeightQuantizer`; the simulation and
the ONNX export both read them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.core.observers import weight_range_mse
from workbench.core.qparams import qparams_from_range
from workbench.core.qtensor import tensor_range
from workbench.core.scheme import Scheme
from workbench.core.weight_codes import WeightCodes, pack_codes
from workbench.engine.blocks import (
    BlockInput,
    call_order,
    first_block_inputs,
    run_block,
    sibling_groups,
)
from workbench.engine.calibration.batches import model_inputs
from workbench.engine.capture.modules import hooks_removed
from workbench.engine.placement.layers import (
    QuantizedEmbedding,
    QuantizedLayer,
    iter_quantized_layers,
    quantized_layer_calls,
    smoothed_input,
)
from workbench.engine.quantizers.modules import WeightQuantizer

BLOCK_SIZE = 128  # columns updated together (lazy batch updates)
DAMP_FRACTION = 0.01  # dampening: this fraction of the mean Hessian diagonal


@dataclass
class GPTQCodes:
    """GPTQ's result for one weight matrix ``[rows, cols]``: integer codes and one scale /
    zero point per row and group (``groups`` = 1 without block-wise scales)."""

    codes: torch.Tensor  # int32 [rows, cols]
    scale: torch.Tensor  # float32 [rows, groups]
    zero_point: torch.Tensor  # int32 [rows, groups]
    group_size: int | None

    def dequantize(self) -> torch.Tensor:
        """``s * (q - z)`` as a float32 ``[rows, cols]`` matrix."""
        scale, zero_point = expand_groups(
            self.scale, self.zero_point, self.codes.shape[1], self.group_size
        )
        return (self.codes.to(torch.float32) - zero_point) * scale


def expand_groups(
    scale: torch.Tensor, zero_point: torch.Tensor, cols: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``[rows, groups]`` qparams repeated to one per weight ``[rows, cols]``
    (groups of ``group_size`` columns, the last one partial; one group without it)."""
    size = group_size or cols
    scale = scale.repeat_interleave(size, dim=1)[:, :cols]
    zero_point = zero_point.to(torch.float32).repeat_interleave(size, dim=1)[:, :cols]
    return scale, zero_point


def row_qparams(
    weight: torch.Tensor, scheme: Scheme, observer: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale / zero point per row of ``weight`` (a group of columns), ``[rows, 1]``."""
    per_row = Scheme(scheme.bits, scheme.symmetric, True, 0, scheme.narrow_range)
    if observer == "mse":
        low, high = weight_range_mse(weight, per_row)
    else:
        low, high = tensor_range(weight, per_row)
    scale, zero_point = qparams_from_range(low, high, per_row, "weight")
    return scale.unsqueeze(1), zero_point.unsqueeze(1)


def _round_to_grid(
    column: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: Scheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of one column (``q = clamp(round(w / s) + z)``, as core.qtensor computes them)
    and their dequantized values."""
    codes = torch.clamp(
        torch.round(column * (1.0 / scale)) + zero_point, scheme.quant_min, scheme.quant_max
    )
    return codes, (codes - zero_point) * scale


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    act_order: bool = False,
    observer: str = "minmax",
    block_size: int = BLOCK_SIZE,
    damp_fraction: float = DAMP_FRACTION,
) -> GPTQCodes:
    """GPTQ codes of ``weight`` (``[rows, cols]``) for the Hessian ``hessian`` (``[cols, cols]``).

    Without ``group_size`` the grid is ``scale`` / ``zero_point`` (0-d or one per row; the
    layer's own qparams), or one computed per row from ``weight`` when they are None. With
    ``group_size`` each run of ``group_size`` columns gets its own scale per row.
    """
    rows, cols = weight.shape
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if group_size is not None:
        block_size = -(-block_size // group_size) * group_size  # a group lies in one block
        groups = -(-cols // group_size)
        scales = torch.zeros(rows, groups, dtype=torch.float32)
        zero_points = torch.zeros(rows, groups, dtype=torch.int32)
        if act_order:  # static groups: fixed from the weights before any update
            for g in range(groups):
                group_cols = slice(g * group_size, (g + 1) * group_size)
                s, z = row_qparams(w[:, group_cols], scheme, observer)
                scales[:, g : g + 1], zero_points[:, g : g + 1] = s, z
    else:
        if scale is None or zero_point is None:
            scale, zero_point = row_qparams(w, scheme, observer)
        scales = scale.detach().to(torch.float32).reshape(-1, 1).expand(rows, 1).clone()
        zero_points = zero_point.detach().to(torch.int32).reshape(-1, 1).expand(rows, 1).clone()

    order = torch.arange(cols)
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp_fraction * torch.mean(torch.diagonal(h)))
    h_inv_upper = _inverse_cholesky_upper(h)

    codes = torch.zeros(rows, cols, dtype=torch.float32)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_inv = h_inv_upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            original = int(order[column])
            if group_size is not None:
                g = original // group_size
                if not act_order and column % group_size == 0:
                    s, z = row_qparams(block[:, i : i + group_size], scheme, observer)
                    scales[:, g : g + 1], zero_points[:, g : g + 1] = s, z
            else:
                g = 0
            s, z = scales[:, g], zero_points[:, g].to(torch.float32)
            q, dq = _round_to_grid(block[:, i], s, z, scheme)
            codes[:, column] = q
            error = (block[:, i] - dq) / h_inv[i, i]
            block[:, i:] -= error.unsqueeze(1) * h_inv[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv_upper[start:end, end:]
    if act_order:
        codes = codes[:, torch.argsort(order)]
    return GPTQCodes(codes.to(torch.int32), scales, zero_points, group_size)


def _inverse_cholesky_upper(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1``; more dampening when ``H`` is numerically singular."""
    damp = torch.mean(torch.diagonal(hessian))
    for attempt in range(8):
        h = (
            hessian
            if attempt == 0
            else hessian + damp * (10.0 ** (attempt - 3)) * torch.eye(hessian.shape[0])
        )
        lower, info = torch.linalg.cholesky_ex(h.to(torch.float64))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper.to(torch.float32)
    raise RuntimeError("the Hessian of the layer's inputs could not be factorised")


# ---- layers: weight matrix views and the Hessian of their inputs --------------------------


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
        return self.dequantized.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rounding=gptq"


# ---- the model: layer by layer in forward order -------------------------------------------


class _InputsTaken(Exception):
    """Stops a forward pass once the layer being quantized has seen its input."""


def _input_quantizer_of_next_call(layer: QuantizedLayer) -> nn.Module | None:
    """The input quantizer the coming call uses (a layer called at several sites has one per
    call, ``engine.placement.layer_calls``; the hook runs before the call counts itself)."""
    of_call = getattr(layer, "input_quantizer_of_call", None)
    if of_call is None:
        return layer.input_quantizer
    return of_call(layer.calls % max(1, layer.call_count))


def layer_hessian(
    model: nn.Module, layer: QuantizedLayer, batches: Sequence[Any], calls_per_forward: int = 1
) -> torch.Tensor | None:
    """``H`` of ``layer``'s inputs in ``model`` (after its input quantizer) over ``batches``;
    None when it never ran. A layer called once per forward stops the pass there."""
    module = layer.layer
    accumulator = HessianAccumulator(weight_matrix(module).shape[1])

    def take(m: nn.Module, args: tuple) -> None:
        x = smoothed_input(module, args[0])  # SmoothQuant's 1/s, as the layer's forward
        quantizer = _input_quantizer_of_next_call(layer)
        if quantizer is not None:
            x = quantizer(x)
        accumulator.add(input_rows(module, x))
        if calls_per_forward == 1:
            raise _InputsTaken

    with hooks_removed([layer.register_forward_pre_hook(take)]), torch.no_grad():
        for batch in batches:
            args, kwargs = model_inputs(batch, model)
            with suppress(_InputsTaken):
                model(*args, **kwargs)
    return accumulator.hessian if accumulator.rows else None


def gptq_model(
    quantized_model: nn.Module,
    batches: Sequence[Any],
    act_order: bool = False,
    progress: bool = True,
) -> list[str]:
    """Round every quantized Linear / Conv with GPTQ, in forward order, in place;
    returns the layers rounded (the others keep round-to-nearest).

    A large decoder is walked block by block (``engine.blocks``): each layer's inputs come from
    running its block on the block's inputs, which the previous (already rounded) block
    produced; layers outside the blocks (an LM head) and other models take whole-model passes.
    """
    rounded: list[str] = []
    done: set[str] = set()
    walk = first_block_inputs(quantized_model, batches)
    if walk is not None:
        blocks, inputs = walk
        layers = dict(iter_quantized_layers(quantized_model))
        for block in tqdm(blocks, desc="gptq (blocks)", disable=not progress):
            calls = Counter(call_order(block, inputs[0]))
            # layers reading one input (q / k / v) take it in one pass, then are rounded
            for group in sibling_groups(block, inputs[0]):
                members = [layers[name] for name in group]
                hessians = _hessians_in_block(block, members, inputs, calls[group[0]])
                for name, layer in zip(group, members, strict=True):
                    hessian = hessians.get(name)
                    if hessian is not None and _round_with_gptq(layer, hessian, act_order):
                        rounded.append(name)
                    done.add(name)
            inputs = [call.with_hidden(run_block(block, call)) for call in inputs]
        del inputs
    calls = Counter(quantized_layer_calls(quantized_model, batches[0]))
    layers = dict(iter_quantized_layers(quantized_model))
    rest = [name for name in calls if name not in done]
    for name in tqdm(rest, desc="gptq", disable=not progress or not rest):
        layer = layers[name]
        if not supports_gptq(layer) or not layer.weight_quantizer.enabled:
            continue
        hessian = layer_hessian(quantized_model, layer, batches, calls[name])
        if hessian is not None and _round_with_gptq(layer, hessian, act_order):
            rounded.append(name)
    return rounded


def _hessians_in_block(
    block: nn.Module,
    layers: list[QuantizedLayer],
    inputs: list[BlockInput],
    calls_per_forward: int,
) -> dict[str, torch.Tensor]:
    """``layer_hessian`` of each of ``layers`` (one input, ``sibling_groups``) over the
    block's calls instead of whole-model passes; a pass stops once all have taken theirs."""
    layers = [layer for layer in layers if supports_gptq(layer) and layer.weight_quantizer.enabled]
    accumulators = {
        layer.layer_name: HessianAccumulator(weight_matrix(layer.layer).shape[1])
        for layer in layers
    }
    taken: set[str] = set()

    def take_for(layer: QuantizedLayer):
        module = layer.layer

        def take(m: nn.Module, args: tuple) -> None:
            x = smoothed_input(module, args[0])
            quantizer = _input_quantizer_of_next_call(layer)
            if quantizer is not None:
                x = quantizer(x)
            accumulators[layer.layer_name].add(input_rows(module, x))
            taken.add(layer.layer_name)
            if calls_per_forward == 1 and len(taken) == len(layers):
                raise _InputsTaken

        return take

    handles = [layer.register_forward_pre_hook(take_for(layer)) for layer in layers]
    with hooks_removed(handles), torch.no_grad():
        for call in inputs:
            taken.clear()
            with suppress(_InputsTaken):
                run_block(block, call)
    return {name: acc.hessian for name, acc in accumulators.items() if acc.rows}


def _round_with_gptq(layer: QuantizedLayer, hessian: torch.Tensor, act_order: bool) -> bool:
    """Give ``layer`` GPTQ's codes for ``hessian``; False for a layer GPTQ does not round."""
    if not supports_gptq(layer) or not layer.weight_quantizer.enabled:
        return False
    quantizer = layer.weight_quantizer
    module = layer.layer
    group_size = getattr(quantizer.scheme, "group_size", None)
    scale = zero_point = None
    if group_size is None:
        scale, zero_point = quantizer.qparams(module.weight)
    result = gptq_quantize(
        weight_matrix(module),
        hessian,
        quantizer.scheme,
        scale,
        zero_point,
        group_size=group_size,
        act_order=act_order,
        observer=quantizer.observer_name,
    )
    layer.weight_quantizer = GPTQWeightQuantizer(quantizer, module, result)
    return True
