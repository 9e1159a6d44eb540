"""Cross-layer equalization: same FP32 function, equal ranges, pairs from the data flow."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

import workbench as wb
from tests.parity_bounds import assert_parity_within_quantization_error
from tests.unit.ptq_methods_models import inverted_residual_net
from workbench.engine.algorithms.equalize import (
    ChannelClippedReLU,
    _input_ranges,
    _output_ranges,
    equalize_model,
)
from workbench.engine.capture.bn_fold import fold_batchnorms


def _relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    return float((reference - output).abs().max() / reference.abs().max())


def _folded(seed: int = 0):
    model = inverted_residual_net(seed)
    batch = torch.randn(16, 1, 8, 8)
    fold_batchnorms(model, batch)
    return model, batch


def test_pairs_cover_depthwise_relu6_functional_relu_and_linear():
    model, batch = _folded()
    pairs = {(p.first, p.second): p.activation_kind for p in equalize_model(model, batch)}
    assert pairs == {
        ("expand", "depthwise"): "relu6",
        ("depthwise", "project"): "relu6",
        ("mix", "mix2"): "relu",
        ("fc1", "fc2"): "relu",
    }
    # the stem's and project's outputs also meet the residual add: they cannot be scaled alone
    assert isinstance(model.expand_act, ChannelClippedReLU)


def test_equalization_keeps_the_fp32_function_and_equalizes_ranges():
    model, batch = _folded()
    fresh = torch.randn(32, 1, 8, 8)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        expected_batch, expected_fresh = reference(batch), reference(fresh)
    pairs = equalize_model(model, batch, absorb_bias=False)
    with torch.no_grad():
        assert _relative_error(expected_batch, model(batch)) < 1e-5
        assert _relative_error(expected_fresh, model(fresh)) < 1e-5
    for pair in pairs:  # converged: both sides of every pair span the same range per channel
        first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
        torch.testing.assert_close(_output_ranges(first), _input_ranges(second), rtol=1e-4, atol=0)
    before = _output_ranges(reference.expand)
    after = _output_ranges(model.expand)
    assert float(after.max() / after.min()) < float(before.max() / before.min())


def test_bias_absorption_keeps_outputs_on_the_calibration_batch():
    model, batch = _folded(seed=1)
    with torch.no_grad():
        expected = model(batch)
    pairs = equalize_model(model, batch, absorb_bias=True)
    assert any(pair.absorbed_bias for pair in pairs)
    with torch.no_grad():
        assert _relative_error(expected, model(batch)) < 1e-5


def test_ptq_with_equalize_keeps_the_reference_and_marks_the_layers():
    model = inverted_residual_net()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    with torch.no_grad():
        expected = model(batches[0])
    result = wb.ptq(model, batches, config=wb.QuantConfig(equalize=True), progress=False)
    with torch.no_grad():
        assert _relative_error(expected, result.fp32_model(batches[0])) < 1e-5
    equalized = {plan.name for plan in result.plans if plan.equalized}
    rows = result.report.layers.set_index("layer")["equalized"]
    assert set(rows[rows.astype(bool)].index) == equalized
    assert result.report.summary["ptq_methods"] == ["cross-layer equalization"]
    assert equalized == {"expand", "depthwise", "project", "mix", "mix2", "fc1", "fc2"}


def test_equalized_relu6_leaves_the_conv_before_it_on_its_integer_kernel(tmp_path, ort_exact_int8):
    model = inverted_residual_net()
    batches = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    config = replace(ort_exact_int8, equalize=True)
    result = wb.ptq(model, batches, config=config, progress=False)
    clipped = result.model.expand_act
    assert isinstance(clipped, ChannelClippedReLU)
    assert float(clipped.upper.max() - clipped.upper.min()) > 1.0  # bounds differ per channel
    path = result.export_onnx(tmp_path / "equalized.onnx", batches[0][:2], check_fusion=False)
    fusion = result.fusion(path)
    kernels = fusion.table.set_index("layer")["kernel"]
    assert kernels["expand"] == "QLinearConv" and kernels["depthwise"] == "QLinearConv"
    assert fusion.unfused == []
    # the per-channel bound runs as Min between the two integer kernels: ORT still computes
    # what the simulation does
    parity = result.parity(path, torch.randn(32, 1, 8, 8), per_layer=False)
    assert_parity_within_quantization_error(parity.table.iloc[0])
