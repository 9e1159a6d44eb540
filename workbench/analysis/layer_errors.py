"""Measure each layer's error on calibration batches against the FP32 model.

* ``output_sqnr_db`` / ``output_cosine``: the layer's output in the quantized model against
  the same layer's output in the FP32 model (errors of earlier layers included: where the
  model's error comes from).
* ``layer_sqnr_db``: the quantized layer alone, fed the FP32 input (its own error only).

An output kept for later comparison is a copy taken when the layer returns it: library code
overwrites outputs in place (``ReLU(inplace=True)``, ``out += identity``), and a kept
reference would then hold what the next op made of it, not what the layer produced.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from workbench.core.metrics import ErrorAccumulator
from workbench.engine.calibration.batches import output_tensor, run_model
from workbench.engine.capture.modules import ROOT_NAME, hooks_removed
from workbench.engine.placement.layers import QuantizedLayer, iter_quantized_layers


def measure_layer_errors(
    fp32_model: nn.Module,
    quantized_model: nn.Module,
    batches: Iterable[Any],
    what: str = "calib_data",
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Return ``({layer: {output_sqnr_db, output_cosine, layer_sqnr_db}}, model_stats)``;
    ``what`` names the batches in errors (``calib_data``, or held-out ``report_data``)."""
    quantized: dict[str, QuantizedLayer] = dict(iter_quantized_layers(quantized_model))
    output_acc = {name: ErrorAccumulator() for name in quantized}
    isolated_acc = {name: ErrorAccumulator() for name in quantized}
    model_acc = ErrorAccumulator()
    # per layer and call: the FP32 model's input and output, until the quantized model's call
    reference: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    in_quantized_model = [False]
    isolating = [False]

    def fp32_hook(name):
        def hook(module, inputs, output):
            pair = (inputs[0].detach().clone(), output.detach().clone())
            reference.setdefault(name, []).append(pair)

        return hook

    def hold_weight(module, inputs):
        if in_quantized_model[0] and not isolating[0]:
            module.weight_quantizer.hold_dequantized = True

    def quant_hook(name):
        def hook(module, inputs, output):
            pending = reference.get(name)
            if not in_quantized_model[0] or isolating[0] or not pending:
                return
            fp32_input, fp32_output = pending.pop(0)
            output_acc[name].add(fp32_output, output)
            # the layer alone on the FP32 input, with the weight this call just dequantized
            calls = getattr(module, "calls", None)
            isolating[0] = True
            try:
                if isinstance(calls, int):
                    module.calls = calls - 1  # this call's input quantizer again
                isolated_acc[name].add(fp32_output, module(fp32_input))
            finally:
                isolating[0] = False
                if isinstance(calls, int):
                    module.calls = calls
                module.weight_quantizer.release_dequantized()

        return hook

    handles = []
    for name, module in fp32_model.named_modules():
        name = name or ROOT_NAME
        if name in quantized:
            handles.append(module.register_forward_hook(fp32_hook(name)))
    for name, module in quantized.items():
        handles.append(module.register_forward_pre_hook(hold_weight))
        handles.append(module.register_forward_hook(quant_hook(name)))
    with hooks_removed(handles), torch.no_grad():
        for index, batch in enumerate(batches):
            reference.clear()
            ref = output_tensor(run_model(fp32_model, batch, index, what))
            in_quantized_model[0] = True
            out = output_tensor(run_model(quantized_model, batch, index, what))
            in_quantized_model[0] = False
            if ref is not None and out is not None and ref.shape == out.shape:
                model_acc.add(ref, out)
    per_layer = {
        name: {
            "output_sqnr_db": output_acc[name].sqnr_db,
            "output_cosine": output_acc[name].cosine,
            "layer_sqnr_db": isolated_acc[name].sqnr_db,
        }
        for name in quantized
    }
    model_stats = {
        "model_output_sqnr_db": model_acc.sqnr_db,
        "model_output_cosine": model_acc.cosine,
    }
    return per_layer, model_stats
