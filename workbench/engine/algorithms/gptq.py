"""GPTQ: weights rounded with second-order error feedback, layer by layer (Frantar et al. 2023,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Rounding each weight to its nearest grid point ignores that the layer's inputs are
correlated. GPTQ quantizes the columns of ``W`` (``[out, in]``) one at a time and moves the
rounding error of each column onto the columns not yet quantized, weighted by the inverse
Hessian of the layer's squared output error on the calibration inputs ``X`` (``[in, n]``):

    H = 2 X X^T / n,   H += damp * mean(diag H) * I                  (dampening)
    U = cholesky(H^-1)^T                                            (upper triangular)
    for each column j:  q_j = Q(w_j),  e_j = (w_j - q_j) / U_jj,  w_k -= e_j U_jk  (k > j)

The column solver (lazy batch updates, act-order, groups) is ``gptq_solver``; this module
gives it each layer's weight matrix and Hessian.

Linear layers (GPT-2's ``Conv1D`` too: the engine holds it as its Linear) and one-group
Conv1d / Conv2d (their inputs unfolded into patches) are rounded; other layers keep
round-to-nearest. ``X`` is the layer's input in the quantized model, with the layers before
it already quantized (and rounded by GPTQ), after its input quantizer when activations are
quantized.
Only ``H`` is kept per layer (``in x in`` floats), never the inputs: memory is bounded by one
batch's activations. The codes are kept in a ``GPTQWeightQuantizer`` (``gptq_layers``): the
simulation and the ONNX export both read them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.engine.algorithms.gptq_layers import (
    GPTQWeightQuantizer,
    HessianAccumulator,
    input_rows,
    supports_gptq,
    weight_matrix,
)
from workbench.engine.algorithms.gptq_solver import (
    HessianFactor,
    factor_hessian,
    gptq_quantize,
)
from workbench.engine.blocks import (
    BlockInput,
    blocks_replayed,
    call_order,
    first_block_inputs,
    hidden_of,
    run_block,
    sibling_groups,
)
from workbench.engine.calibration.batches import model_inputs
from workbench.engine.capture.modules import hooks_removed
from workbench.engine.free_cpus import threads_on_free_cpus
from workbench.engine.placement.layers import (
    QuantizedLayer,
    iter_quantized_layers,
    quantized_layer_calls,
    smoothed_input,
)

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
    model: nn.Module,
    layer: QuantizedLayer,
    batches: Sequence[Any],
    calls_per_forward: int = 1,
    before_batch: Callable[[int], None] | None = None,
) -> torch.Tensor | None:
    """``H`` of ``layer``'s inputs in ``model`` (after its input quantizer) over ``batches``;
    None when it never ran. A layer called once per forward stops the pass there.
    ``before_batch`` is told each batch's index before its pass."""
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
        for index, batch in enumerate(batches):
            if before_batch is not None:
                before_batch(index)
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
    produced. Layers after the blocks (an LM head) then take passes in which every block
    returns the walk's last output instead of running again (``blocks_replayed``), so their
    inputs (after the final norm) cost no second pass through the blocks; other models take
    whole-model passes.
    """
    rounded: list[str] = []
    done: set[str] = set()
    replay: AbstractContextManager = nullcontext()
    walk = first_block_inputs(quantized_model, batches)
    if walk is not None:
        blocks, inputs = walk
        layers = dict(iter_quantized_layers(quantized_model))
        for block in tqdm(blocks, desc="gptq (blocks)", disable=not progress):
            with threads_on_free_cpus():  # a long walk: the machine's load may change
                inputs, outputs = _gptq_block(block, inputs, layers, act_order, rounded, done)
        del inputs
        replay = blocks_replayed(blocks, outputs)  # the layers after them read the walk's end
    with replay as choose_batch:
        rounded += _gptq_rest(quantized_model, batches, done, act_order, progress, choose_batch)
    return rounded


def _gptq_block(
    block: nn.Module,
    inputs: list[BlockInput],
    layers: dict[str, QuantizedLayer],
    act_order: bool,
    rounded: list[str],
    done: set[str],
) -> tuple[list[BlockInput], list[Any]]:
    """Round one block's layers (appended to ``rounded`` and ``done``); the next block's inputs
    and this block's outputs."""
    calls = Counter(call_order(block, inputs[0]))
    in_block: list[str] = []
    try:
        # layers reading one input (q / k / v) take it in one pass, then are rounded; those
        # that read it unchanged share one Hessian, factored once
        for group in sibling_groups(block, inputs[0]):
            members = [layers[name] for name in group]
            hessians = _hessians_in_block(block, members, inputs, calls[group[0]])
            shared = _by_hessian(hessians)
            while shared:
                hessian, names = shared.pop(0)
                factor = factor_hessian(hessian, act_order)
                del hessian  # freed now: the factor holds what the solver needs
                in_block += [name for name in names if _round_with_gptq(layers[name], factor)]
            for name in in_block:  # the passes after this group read them: unpacked once
                quantizer = layers[name].weight_quantizer
                if quantizer.kept_dequantized is None:
                    quantizer.kept_dequantized = quantizer.dequantized
            done.update(group)
        with torch.no_grad():
            outputs = [block(*call.args, **call.kwargs) for call in inputs]
    finally:
        for name in in_block:
            layers[name].weight_quantizer.kept_dequantized = None
    rounded += in_block
    inputs = [call.with_hidden(hidden_of(out)) for call, out in zip(inputs, outputs, strict=True)]
    return inputs, outputs


def _gptq_rest(
    quantized_model: nn.Module,
    batches: Sequence[Any],
    done: set[str],
    act_order: bool,
    progress: bool,
    choose_batch: Callable[[int], None] | None,
) -> list[str]:
    """GPTQ on the layers the block walk did not round, with whole-model passes."""
    rounded: list[str] = []
    calls = Counter(quantized_layer_calls(quantized_model, batches[0]))
    layers = dict(iter_quantized_layers(quantized_model))
    rest = [name for name in calls if name not in done]
    for name in tqdm(rest, desc="gptq", disable=not progress or not rest):
        layer = layers[name]
        if not supports_gptq(layer) or not layer.weight_quantizer.enabled:
            continue
        hessian = layer_hessian(quantized_model, layer, batches, calls[name], choose_batch)
        if hessian is not None and _round_with_gptq(layer, factor_hessian(hessian, act_order)):
            rounded.append(name)
    return rounded


def _hessians_in_block(
    block: nn.Module,
    layers: list[QuantizedLayer],
    inputs: list[BlockInput],
    calls_per_forward: int,
) -> dict[str, torch.Tensor]:
    """``layer_hessian`` of each of ``layers`` (one input, ``sibling_groups``) over the
    block's calls instead of whole-model passes; a pass stops once all have taken theirs.
    Linears that read the very same tensor (no smoothing or input quantizer of their own in
    between) get one accumulator, hence the same Hessian object."""
    layers = [layer for layer in layers if supports_gptq(layer) and layer.weight_quantizer.enabled]
    accumulators = {
        layer.layer_name: HessianAccumulator(weight_matrix(layer.layer).shape[1])
        for layer in layers
    }
    taken: set[str] = set()
    read: list[tuple[torch.Tensor, str]] = []  # this call's Linear inputs (kept: ids stay unique)

    def take_for(layer: QuantizedLayer):
        module, name = layer.layer, layer.layer_name

        def take(m: nn.Module, args: tuple) -> None:
            x = smoothed_input(module, args[0])
            quantizer = _input_quantizer_of_next_call(layer)
            if quantizer is not None:
                x = quantizer(x)
            same = [first for tensor, first in read if tensor is x and first != name]
            if same and isinstance(module, nn.Linear):
                accumulators[name] = accumulators[same[0]]  # adds once, for both
            else:
                accumulators[name].add(input_rows(module, x))
                if isinstance(module, nn.Linear):
                    read.append((x, name))
            taken.add(name)
            if calls_per_forward == 1 and len(taken) == len(layers):
                raise _InputsTaken

        return take

    handles = [layer.register_forward_pre_hook(take_for(layer)) for layer in layers]
    with hooks_removed(handles), torch.no_grad():
        for call in inputs:
            taken.clear()
            read.clear()
            with suppress(_InputsTaken):
                run_block(block, call)
    read.clear()
    hessians = {id(acc): acc.hessian for acc in accumulators.values() if acc.rows}
    return {name: hessians[id(acc)] for name, acc in accumulators.items() if acc.rows}


def _by_hessian(hessians: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, list[str]]]:
    """The layers of ``hessians`` grouped by Hessian object, in order; empties the dict, so
    that the returned list holds the only references (popped, a Hessian's memory goes once
    its factor is computed)."""
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, hessian in hessians.items():
        groups.setdefault(id(hessian), (hessian, []))[1].append(name)
    hessians.clear()
    return list(groups.values())


def _round_with_gptq(layer: QuantizedLayer, hessian: torch.Tensor | HessianFactor) -> bool:
    """Give ``layer`` GPTQ's codes for ``hessian`` (or its factor, whose ``act_order``
    applies); False for a layer GPTQ does not round."""
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
        observer=quantizer.observer_name,
    )
    layer.weight_quantizer = GPTQWeightQuantizer(quantizer, module, result)
    return True
