"""Empirical bias correction: the mean output error per channel vanishes on the calibration
data (up to the INT32 grid the bias is stored on)."""

from __future__ import annotations

from dataclasses import replace

import torch

import workbench as wb
from tests.unit.ptq_methods_models import inverted_residual_net
from workbench.engine.algorithms.bias_correction import mean_output_errors
from workbench.engine.placement.graph_quantizers import bias_scale_of
from workbench.engine.placement.layers import iter_quantized_layers

W4A8_PER_TENSOR = wb.QuantConfig(weight=wb.Scheme(4, True, False))


def _batches():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(16, 1, 8, 8, generator=generator) for _ in range(3)]


def test_bias_correction_zeroes_the_mean_output_error_per_channel():
    model, batches = inverted_residual_net(), _batches()
    plain = wb.ptq(model, batches, config=W4A8_PER_TENSOR, progress=False)
    corrected_config = wb.QuantConfig(weight=wb.Scheme(4, True, False), bias_correction=True)
    corrected = wb.ptq(model, batches, config=corrected_config, progress=False)

    before = mean_output_errors(plain.fp32_model, plain.model, batches)
    after = mean_output_errors(corrected.fp32_model, corrected.model, batches)
    layers = dict(iter_quantized_layers(corrected.model))
    assert set(after) == set(layers)
    for name, error in after.items():
        # what is left is the rounding of the corrected bias to s_input * s_weight
        half_step = bias_scale_of(layers[name]).to(torch.float64) / 2
        assert bool((error.abs() <= half_step * 1.01 + 1e-6).all()), name
    largest_before = max(float(error.abs().max()) for error in before.values())
    largest_after = max(float(error.abs().max()) for error in after.values())
    assert largest_after < largest_before / 10
    assert all(plan.bias_corrected for plan in corrected.plans if plan.status == "quantized")
    assert not any(plan.bias_corrected for plan in plain.plans)
    rows = corrected.report.layers.set_index("layer")
    assert rows.loc[list(layers), "bias_corrected"].tolist() == [True] * len(layers)
    assert set(rows.loc[list(layers), "weight_rounding"]) == {"nearest"}
    assert corrected.report.summary["ptq_methods"] == ["empirical bias correction"]
    assert plain.report.summary["ptq_methods"] == []


def test_bias_correction_moves_the_model_output_closer_to_fp32():
    model, batches = inverted_residual_net(seed=2), _batches()
    config = wb.QuantConfig(weight=wb.Scheme(4, True, False))
    plain = wb.ptq(model, batches, config=config, progress=False)
    corrected = wb.ptq(
        model,
        batches,
        config=replace(config, bias_correction=True),
        progress=False,
    )
    with torch.no_grad():
        reference = plain.fp32_model(batches[0])
        mean_error_plain = (plain.model(batches[0]) - reference).mean(0).abs().mean()
        mean_error_corrected = (corrected.model(batches[0]) - reference).mean(0).abs().mean()
    assert float(mean_error_corrected) < float(mean_error_plain)
