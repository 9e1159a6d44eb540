"""An independent measurement of each quantized layer's output SQNR: forward hooks that copy
every output when the layer returns it (on the FP32 model, the BatchNorm's output where one
was folded into the layer; on ``result.model``), the same batches, SQNR computed here."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from workbench.engine.calibration.batches import model_inputs

SQNR_AGREEMENT_DB = 1.0


def copied_outputs(model: nn.Module, names: dict[str, str], batches) -> dict[str, list]:
    """``{layer: [outputs]}``: the output of module ``names[layer]`` of ``model`` at each call,
    copied when it is returned."""
    found: dict[str, list[torch.Tensor]] = {layer: [] for layer in names}
    handles = [
        model.get_submodule(module).register_forward_hook(
            lambda m, i, o, k=layer: found[k].append(o.detach().clone())
        )
        for layer, module in names.items()
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                args, kwargs = model_inputs(batch, model)
                model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def sqnr_db(reference: list[torch.Tensor], measured: list[torch.Tensor]) -> float:
    assert len(reference) == len(measured) > 0
    signal = sum(float(r.double().pow(2).sum()) for r in reference)
    noise = sum(
        float((r.double() - m.double()).pow(2).sum())
        for r, m in zip(reference, measured, strict=True)
    )
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def check_report_against_hooks(model: nn.Module, result, batches) -> int:
    """Every quantized layer's ``output_sqnr_db`` within 1 dB of the copied-hook measurement
    on ``batches`` (the report's own batches); returns how many layers were checked."""
    layers = result.report.layers
    quantized = layers[layers["status"] == "quantized"]["layer"].tolist()
    folded = {}  # layer -> the BatchNorm folded into it (its output is the layer's)
    for reason, bn in zip(layers["reason"], layers["layer"], strict=True):
        match = re.fullmatch(r"folded into (.+)", str(reason))
        if match:
            folded[match.group(1)] = bn
    fp32 = copied_outputs(model, {name: folded.get(name, name) for name in quantized}, batches)
    simulated = copied_outputs(result.model, {name: name for name in quantized}, batches)
    reported = layers.set_index("layer")["output_sqnr_db"]
    for name in quantized:
        measured = sqnr_db(fp32[name], simulated[name])
        assert reported[name] == pytest.approx(measured, abs=SQNR_AGREEMENT_DB), name
    return len(quantized)
