"""Check that every quantized layer's stand-in changes nothing but the quantization.

A ``QuantizedLayer`` reads attributes through to the module it wraps (``engine.placement.layers``),
but
it is not an instance of that module's class: a forward that branches on
``isinstance(self.conv, nn.Conv2d)``, ``type(m) is nn.Linear`` or the module's identity takes
another path with the stand-in in place. So once the layers are swapped, the model runs one
batch with every quantizer switched off; it must compute what the FP32 model computes. When
it does not, the stand-ins are put back one at a time to find the ones the forward treats
differently; those layers are kept FP32 with that reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from workbench.engine.calibration.batches import output_tensor, run_model
from workbench.engine.capture.modules import ROOT_NAME, find_submodule, set_submodule
from workbench.engine.placement.layers import QuantizedLayer, iter_quantized_layers

STAND_IN_NOTE = (
    "the model's forward treats the quantized stand-in differently from the {type} it "
    "replaces (an isinstance or type check): kept FP32"
)


@contextmanager
def _quantizers_off(layers: list[QuantizedLayer]) -> Iterator[None]:
    saved = [(layer, layer.weight_quantizer.enabled, layer.input_quantizer) for layer in layers]
    try:
        for layer, _, _ in saved:
            layer.weight_quantizer.enabled = False
            layer.input_quantizer = None
        yield
    finally:
        for layer, enabled, input_quantizer in saved:
            layer.weight_quantizer.enabled = enabled
            layer.input_quantizer = input_quantizer


def _output(model: nn.Module, batch: Any) -> torch.Tensor | None:
    with torch.no_grad():
        return output_tensor(run_model(model, batch))


def _same(reference: torch.Tensor | None, output: torch.Tensor | None) -> bool:
    if reference is None or output is None:
        return reference is None and output is None
    if reference.shape != output.shape or reference.dtype != output.dtype:
        return False
    if not reference.is_floating_point():
        return bool(torch.equal(reference, output))
    if not torch.isfinite(reference).all():
        return True  # NaN / Inf in the data: calibration names it; nothing to compare here
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return bool(torch.allclose(reference, output, rtol=1e-5, atol=1e-6 * (scale or 1.0)))


def stand_ins_that_change_the_model(
    reference: torch.Tensor | None, prepared: nn.Module, batch: Any
) -> list[str]:
    """The layers of ``prepared`` whose stand-in makes its forward differ from the FP32
    model's main output ``reference`` on ``batch`` (quantizers off). ``prepared`` is left as it
    was given."""
    layers = {name: layer for name, layer in iter_quantized_layers(prepared) if name != ROOT_NAME}
    if not layers or reference is None:
        return []
    with _quantizers_off(list(layers.values())):
        if _same(reference, _output(prepared, batch)):
            return []
        culprits: list[str] = []
        for name, layer in layers.items():  # all back to FP32 modules, then one at a time
            set_submodule(prepared, name, layer.layer)
        if not _same(reference, _output(prepared, batch)):
            for name, layer in layers.items():
                set_submodule(prepared, name, layer)
            return []  # not the stand-ins: the model itself is not deterministic
        for name, layer in layers.items():
            set_submodule(prepared, name, layer)
            if not _same(reference, _output(prepared, batch)):
                culprits.append(name)
                set_submodule(prepared, name, layer.layer)
        for name in culprits:
            set_submodule(prepared, name, layers[name])
    return culprits


def unwrap(prepared: nn.Module, name: str) -> None:
    """Put the FP32 module back in place of layer ``name``'s stand-in."""
    layer = find_submodule(prepared, name)
    if isinstance(layer, QuantizedLayer):
        set_submodule(prepared, name, layer.layer)
