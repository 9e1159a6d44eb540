"""Keep a model's train / eval flags as they were, module by module.

``model.train(was_training)`` restores only the top-level flag and sets every submodule to
it, which changes a model whose parts were in different modes (e.g. a frozen BatchNorm in
eval inside a model in training). Used wherever the user's model runs: ``eval_fn`` calls,
ONNX export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def training_modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit, whatever the body set."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
