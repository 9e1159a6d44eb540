"""Walk a large model block by block (as GPTQ's reference code and llm-compressor do).

A decoder is a stack of identical blocks, each fed the previous one's output. Instead of
running the whole model once per layer (every step before the layer again), the inputs of
the first block are captured once per batch, each block is processed on them, and its
outputs become the next block's inputs: the cost is one pass over the model, and only one
block's activations are kept.

The blocks are the longest ``nn.ModuleList`` of modules of one type holding quantized layers
(``model.layers`` of a LLaMA, ``transformer.h`` of a GPT-2). The walk checks its own premise on
the first batch: the second block's captured input must be the first block's output, with the
same other arguments; otherwise (a model that transforms activations between blocks) it is not
used and the caller falls back to whole-model passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.engine.calibration.batches import model_inputs
from workbench.engine.capture.modules import hooks_removed, tensor_bytes
from workbench.engine.placement.layers import QuantizedLayer

# models with this many bytes of weights are walked block by block (smaller ones run whole)
BLOCK_WALK_MODEL_BYTES = 256 * 1024**2


class _Stop(Exception):
    """Ends a forward pass once the inputs it was run for are captured."""


@dataclass
class BlockInput:
    """One batch's call of a block: the hidden state and the other arguments."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> Any:
        return self.args[0] if self.args else self.kwargs.get("hidden_states")

    def with_hidden(self, hidden: torch.Tensor) -> BlockInput:
        if self.args:
            return BlockInput((hidden, *self.args[1:]), self.kwargs)
        return BlockInput((), {**self.kwargs, "hidden_states": hidden})


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(name, blocks)``: the longest ModuleList of two or more modules of one type that hold
    quantized layers; None when the model has none."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not all(any(isinstance(m, QuantizedLayer) for m in child.modules()) for child in module):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def hidden_of(output: Any) -> torch.Tensor:
    """A block's output hidden state (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple | list) else output


def run_block(block: nn.Module, call: BlockInput) -> torch.Tensor:
    with torch.no_grad():
        return hidden_of(block(*call.args, **call.kwargs))


def _capture(model: nn.Module, block: nn.Module, batch: Any) -> BlockInput | None:
    captured: list[BlockInput] = []

    def take(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(BlockInput(tuple(args), dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(take, with_kwargs=True)
    with hooks_removed([handle]), torch.no_grad(), suppress(_Stop):
        args, kwargs = model_inputs(batch, model)
        model(*args, **kwargs)
    return captured[0] if captured else None


def _same_arguments(a: BlockInput, b: BlockInput) -> bool:
    """The same arguments besides the hidden state."""
    if len(a.args) != len(b.args) or a.kwargs.keys() != b.kwargs.keys():
        return False
    pairs = list(zip(a.args[1:], b.args[1:], strict=True))
    pairs += [(a.kwargs[k], b.kwargs[k]) for k in a.kwargs if a.args or k != "hidden_states"]
    return all(_equal(x, y) for x, y in pairs)


def _equal(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return x.shape == y.shape and bool(torch.equal(x, y))
    if isinstance(x, tuple | list) and isinstance(y, tuple | list):
        return len(x) == len(y) and all(_equal(p, q) for p, q in zip(x, y, strict=True))
    return x is y or x == y


def first_block_inputs(
    model: nn.Module, batches: Sequence[Any], min_bytes: int | None = None
) -> tuple[nn.ModuleList, list[BlockInput]] | None:
    """The blocks of ``model`` and each batch's input to the first one, when ``model`` is large
    enough (``min_bytes``, default ``BLOCK_WALK_MODEL_BYTES``) and is a chain of blocks (checked
    on the first batch); else None."""
    threshold = BLOCK_WALK_MODEL_BYTES if min_bytes is None else min_bytes
    found = block_list(model)
    if found is None or not batches or tensor_bytes(model) < threshold:
        return None
    blocks = found[1]
    inputs = [_capture(model, blocks[0], batch) for batch in batches]
    if any(call is None or not isinstance(call.hidden, torch.Tensor) for call in inputs):
        return None
    second = _capture(model, blocks[1], batches[0])
    if second is None or not _same_arguments(inputs[0], second):
        return None
    expected = run_block(blocks[0], inputs[0])
    received = second.hidden
    if not isinstance(received, torch.Tensor) or expected.shape != received.shape:
        return None
    if not torch.allclose(expected, received, rtol=1e-5, atol=1e-6):
        return None
    return blocks, inputs


@contextmanager
def blocks_replayed(
    blocks: nn.ModuleList, outputs: Sequence[Any]
) -> Iterator[Callable[[int], None]]:
    """Inside, every block returns ``outputs[i]`` (the last block's output on batch ``i``, as
    the walk computed it) without running; yields the function that chooses ``i`` (0 first).
    The model's passes then run only what lies before and after the blocks (a decoder's
    embedding, its final norm and LM head), with the inputs a whole-model pass would give."""
    chosen = [0]

    def replay(*args: Any, **kwargs: Any) -> Any:
        return outputs[chosen[0]]

    for block in blocks:
        block.forward = replay
    try:
        yield lambda index: chosen.__setitem__(0, index)
    finally:
        for block in blocks:
            del block.forward


def call_order(block: nn.Module, call: BlockInput) -> list[str]:
    """The quantized layers of ``block`` in the order one call runs them (repeats kept)."""
    return [name for name, _ in _calls_with_inputs(block, call)]


def sibling_groups(block: nn.Module, call: BlockInput) -> list[list[str]]:
    """The quantized layers of ``block`` in call order, grouped when consecutive calls read
    the very same input tensor (a decoder's q / k / v projections, its gate and up
    projections): no layer of a group feeds another, so their inputs can be taken in one
    pass. A layer called more than once is a group of its own."""
    calls = _calls_with_inputs(block, call)
    counts: dict[str, int] = {}
    for name, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    groups: list[list[str]] = []
    last_input = None
    seen: set[str] = set()
    for name, input_id in calls:
        if name in seen:
            continue
        seen.add(name)
        alone = counts[name] > 1
        if groups and not alone and input_id == last_input and counts[groups[-1][0]] == 1:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = None if alone else input_id
    return groups


def _calls_with_inputs(block: nn.Module, call: BlockInput) -> list[tuple[str, int]]:
    order: list[tuple[str, int]] = []
    kept: list[torch.Tensor] = []  # ids stay unique while the inputs are alive

    def record(module: nn.Module, args: tuple) -> None:
        kept.append(args[0])
        order.append((module.layer_name, id(args[0])))

    handles = [
        module.register_forward_pre_hook(record)
        for module in block.modules()
        if isinstance(module, QuantizedLayer)
    ]
    with hooks_removed(handles):
        run_block(block, call)
    return order
