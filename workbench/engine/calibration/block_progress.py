"""A progress bar per decoder block for the passes over a large model (calibration, the
report's passes, the export's trace), as GPTQ's block walk shows one."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

from torch import nn
from tqdm.auto import tqdm

from workbench.engine.blocks import block_list
from workbench.engine.capture.modules import hooks_removed


@contextmanager
def block_progress(
    model: nn.Module,
    desc: str,
    passes: int | None,
    progress: bool = True,
    others: Sequence[nn.Module] = (),
) -> Iterator[None]:
    """While the body runs ``passes`` forward passes (None: not known) of ``model`` and of
    ``others`` (models with the same blocks under the same name, e.g. the FP32 model), a bar
    that advances by one at every block call; nothing when ``progress`` is False or ``model``
    has no list of blocks (``engine.blocks.block_list``)."""
    found = block_list(model) if progress else None
    if found is None:
        yield
        return
    name, blocks = found
    lists = [blocks]
    for other in others:
        with suppress(AttributeError):
            lists.append(other.get_submodule(name))
    total = None if passes is None else passes * len(blocks)
    bar = tqdm(total=total, desc=desc, unit="block")
    handles = [block.register_forward_hook(lambda *_: bar.update(1)) for b in lists for block in b]
    try:
        with hooks_removed(handles):
            yield
    finally:
        bar.close()
