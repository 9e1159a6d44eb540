"""AdaRound: per weight the code is the floor or the ceiling of W / s, the learned rounding
lowers the layer's output error, and the ONNX export stores exactly the learned codes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import workbench as wb
from tests.unit.ptq_methods_models import inverted_residual_net
from workbench.engine.algorithms.adaround import AdaRoundWeightQuantizer
from workbench.engine.placement.layers import iter_quantized_layers

W3A8 = dict(weight=wb.Scheme(3, True, True, 0), activation=wb.Scheme(8, False, False))


def _batches():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(16, 1, 8, 8, generator=generator) for _ in range(2)]


@pytest.fixture(scope="module")
def rounded():
    model, batches = inverted_residual_net(seed=3), _batches()
    nearest = wb.ptq(model, batches, config=wb.QuantConfig(**W3A8), progress=False)
    config = wb.QuantConfig(**W3A8, weight_method="adaround", adaround_iterations=100)
    learned = wb.ptq(model, batches, config=config, progress=False)
    return nearest, learned, batches


def _codes(layer) -> torch.Tensor:
    """The integer codes the simulation uses: dequantized weight / scale + zero point."""
    quantizer = layer.weight_quantizer
    scale, zero_point = quantizer.qparams(layer.weight)
    shape = [-1] + [1] * (layer.weight.dim() - 1)
    weight = layer.quantized_weight().detach()
    return torch.round(weight / scale.reshape(shape)) + zero_point.reshape(shape)


def test_every_code_is_the_floor_or_the_ceiling_of_the_scaled_weight(rounded):
    _, learned, _ = rounded
    layers = dict(iter_quantized_layers(learned.model))
    assert all(
        isinstance(layer.weight_quantizer, AdaRoundWeightQuantizer) for layer in layers.values()
    )
    changed = 0
    for layer in layers.values():
        scale, zero_point = layer.weight_quantizer.qparams(layer.weight)
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        scaled = layer.weight.detach() / scale.reshape(shape) + zero_point.reshape(shape)
        codes = _codes(layer)
        assert bool(((codes == torch.floor(scaled)) | (codes == torch.ceil(scaled))).all())
        changed += int((codes != torch.round(scaled)).sum())
    assert changed > 0  # some weights were rounded away from the nearest grid point
    assert {plan.weight_rounding for plan in learned.plans if plan.status == "quantized"} == {
        "adaround"
    }


def test_learned_rounding_lowers_the_output_error(rounded):
    nearest, learned, batches = rounded
    with torch.no_grad():
        reference = learned.fp32_model(batches[0])
        error_nearest = (nearest.model(batches[0]) - reference).pow(2).mean()
        error_learned = (learned.model(batches[0]) - reference).pow(2).mean()
    assert float(error_learned) < float(error_nearest)


def test_the_export_stores_the_learned_codes(rounded, tmp_path):
    _, learned, batches = rounded
    path = learned.export_onnx(tmp_path / "adaround.onnx", batches[0][:1])
    graph = onnx.load(str(path)).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    integer = [a for a in initializers.values() if a.dtype in (np.int8, np.uint8) and a.ndim >= 2]
    simulated = [_codes(layer).numpy() for _, layer in iter_quantized_layers(learned.model)]
    for codes in simulated:
        candidates = [a for a in integer if a.shape == codes.shape or a.shape == codes.T.shape]
        assert any(
            np.array_equal(a, codes) or (a.ndim == 2 and np.array_equal(a, codes.T))
            for a in candidates
        )
