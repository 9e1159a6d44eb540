"""Gradients of a layer prepared for QAT, checked against PyTorch's fake-quant kernels and a
finite-difference check of LSQ's scale gradient (through the whole layer, not the core alone)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from workbench.engine.calibration.calibrate import calibrate, finish_calibration, prepare_model
from workbench.engine.quantizers.qat import enable_qat


def qat_layer(module: nn.Module, calib: torch.Tensor, config: wb.QuantConfig, learn: bool):
    """``module`` wrapped as a calibrated QuantizedLayer switched to QAT."""
    _, prepared, plans = prepare_model(nn.Sequential(module), calib, config)
    finish_calibration(prepared, plans, calibrate(prepared, [calib], progress=False))
    enable_qat(prepared, learn_scales=learn)
    return prepared[0]


def test_activation_ste_is_one_inside_the_range_and_zero_outside():
    torch.manual_seed(0)
    layer = qat_layer(nn.Linear(6, 3), torch.rand(32, 6), wb.QuantConfig(), learn=False)
    quantizer = layer.input_quantizer
    x = torch.linspace(-0.5, 1.5, 400).requires_grad_(True)
    quantizer(x).sum().backward()

    s, z = float(quantizer.scale), int(quantizer.zero_point)
    codes = torch.round(x.detach() / s) + z
    inside = ((codes >= 0) & (codes <= 255)).float()
    assert 0 < int(inside.sum()) < len(x)  # both regions are exercised
    torch.testing.assert_close(x.grad, inside, rtol=0, atol=0)


def test_layer_gradients_match_torch_fake_quant_reference():
    """Input STE masked outside the calibrated range; the weight's gradient is the gradient
    the quantized weight receives (minmax qparams follow the weight, so nothing is clipped)."""
    torch.manual_seed(1)
    layer = qat_layer(nn.Linear(6, 3), torch.rand(32, 6), wb.QuantConfig(), learn=False)
    with torch.no_grad():
        layer.layer.weight.mul_(1.7)  # a weight that moved since calibration
    x = (torch.rand(16, 6) * 2 - 0.5).requires_grad_(True)
    upstream = torch.randn(16, 3)
    (layer(x) * upstream).sum().backward()

    weight = layer.layer.weight.detach()
    w_scale = weight.abs().amax(dim=1) / 127
    ref_w = torch.fake_quantize_per_channel_affine(
        weight, w_scale, torch.zeros(3, dtype=torch.int32), 0, -128, 127
    ).requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    a = layer.input_quantizer
    ref_xq = torch.fake_quantize_per_tensor_affine(ref_x, float(a.scale), int(a.zero_point), 0, 255)
    ref_y = F.linear(ref_xq, ref_w, layer.layer.bias.detach())
    (ref_y * upstream).sum().backward()

    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(layer.layer.weight.grad, ref_w.grad)
    assert bool((x.grad == 0).any())  # some inputs lie outside the calibrated range


def test_weight_ste_is_zero_where_a_learned_scale_clips():
    torch.manual_seed(2)
    layer = qat_layer(nn.Linear(8, 4), torch.rand(16, 8), wb.QuantConfig(), learn=True)
    quantizer = layer.weight_quantizer
    with torch.no_grad():
        quantizer.scale.mul_(0.5)  # half the range: the largest weights now clip
    weight = layer.layer.weight
    quantizer(weight).sum().backward()

    codes = torch.round(weight.detach() / quantizer.scale.detach().reshape(-1, 1))
    inside = ((codes >= -128) & (codes <= 127)).float()
    assert 0 < int(inside.sum()) < weight.numel()
    torch.testing.assert_close(weight.grad, inside, rtol=0, atol=0)


def fake_quant_surrogate(v, scale, zero_point, residual, quant_min, quant_max):
    """``(clamp(v/s + r + z) - z) * s`` with the rounding residual ``r`` held fixed: equal to
    fake quantization at the scale ``r`` was taken at, and smooth in ``s`` (LSQ's gradient)."""
    codes = torch.clamp(v / scale + residual + zero_point, quant_min, quant_max)
    return (codes - zero_point) * scale


def off_the_clamp_edges(v, scale, zero_point, quant_min, quant_max):
    """Zero (in place) the values whose code is exactly q_min or q_max: there the surrogate
    has a kink (one side inside, the other clipped), so a finite difference straddles both."""
    with torch.no_grad():
        codes = torch.round(v / scale) + zero_point
        v.masked_fill_((codes == quant_min) | (codes == quant_max), 0.0)


@pytest.mark.parametrize("activation_bits", [8, 4])
def test_lsq_scale_gradients_of_a_layer_match_finite_differences(activation_bits):
    torch.manual_seed(3)
    config = wb.QuantConfig(
        weight=wb.Scheme(4, True, True, 0), activation=wb.Scheme(activation_bits, False, False)
    )
    calib = torch.rand(16, 12) * 2 - 0.3
    layer = qat_layer(nn.Linear(12, 3), calib, config, learn=True).double()
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    with torch.no_grad():
        aq.scale.mul_(0.8)  # so that some activations clip
        wq.scale.mul_(0.9)  # and some weights
        off_the_clamp_edges(layer.layer.weight, wq.scale.reshape(-1, 1), 0, -8, 7)
    x = (torch.rand(6, 12, dtype=torch.float64) * 2 - 0.3) * 1.2
    off_the_clamp_edges(x, aq.scale.detach(), float(aq.zero_point), 0, aq.scheme.quant_max)
    upstream = torch.randn(6, 3, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()

    weight = layer.layer.weight.detach()
    bias = layer.layer.bias.detach()
    a_scale0, w_scale0 = aq.scale.detach().clone(), wq.scale.detach().clone()
    a_zero, a_max = float(aq.zero_point), aq.scheme.quant_max
    x_res = torch.round(x / a_scale0) - x / a_scale0
    w_view = w_scale0.reshape(-1, 1)
    w_res = torch.round(weight / w_view) - weight / w_view
    assert float(x_res.abs().max()) < 0.499 and float(w_res.abs().max()) < 0.499
    codes = torch.round(x / a_scale0) + a_zero
    assert bool(((codes < 0) | (codes > a_max)).any())  # the clipped branches are exercised
    w_codes = torch.round(weight / w_view)
    assert bool(((w_codes < -8) | (w_codes > 7)).any())

    def objective(a_scale, w_scale):
        xq = fake_quant_surrogate(x, a_scale, a_zero, x_res, 0, a_max)
        w = fake_quant_surrogate(weight, w_scale.reshape(-1, 1), 0.0, w_res, -8, 7)
        return float((F.linear(xq, w, bias) * upstream).sum())

    # the surrogate is the layer's forward at the current scales
    forward = float((layer(x) * upstream).sum().detach())
    assert abs(objective(a_scale0, w_scale0) - forward) < 1e-9
    eps = 1e-7
    fd_a = (objective(a_scale0 + eps, w_scale0) - objective(a_scale0 - eps, w_scale0)) / (2 * eps)
    fd_w = torch.zeros(3, dtype=torch.float64)
    for c in range(3):
        up, down = w_scale0.clone(), w_scale0.clone()
        up[c] += eps
        down[c] -= eps
        fd_w[c] = (objective(a_scale0, up) - objective(a_scale0, down)) / (2 * eps)

    # LSQ scales the gradient by g = 1 / sqrt(values per scale * q_max)
    g_a = 1 / math.sqrt(x.numel() * a_max)
    g_w = 1 / math.sqrt(weight[0].numel() * 7)
    assert abs(fd_a) > 1e-3 and float(fd_w.abs().min()) > 1e-4  # gradients that can be wrong
    torch.testing.assert_close(
        aq.scale.grad, torch.tensor(g_a * fd_a, dtype=torch.float64), rtol=1e-5, atol=1e-9
    )
    torch.testing.assert_close(wq.scale.grad, g_w * fd_w, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("learn", [False, True])
def test_switching_off_shared_input_quantizers_changes_nothing(learn):
    """A layer input that shares the scale of the output quantizer feeding it is switched off
    while training: forward and gradients are exactly those with it on."""
    from workbench.demo import DigitsCNN
    from workbench.engine.quantizers.modules import OFF, QUANTIZE

    torch.manual_seed(4)
    calib = [torch.rand(32, 1, 8, 8) for _ in range(2)]
    _, prepared, plans = prepare_model(DigitsCNN(4).eval(), calib[0], wb.QuantConfig())
    finish_calibration(prepared, plans, calibrate(prepared, calib, progress=False))
    enable_qat(prepared, learn_scales=learn)
    prepared.train()
    switched_off = [q for q in prepared.modules() if getattr(q, "mode", None) == OFF]
    assert {q.tensor_name for q in switched_off} == {"input of conv2", "input of fc1"}

    def run():
        prepared.zero_grad(set_to_none=True)
        out = prepared(calib[1] * 1.3)
        (out * torch.linspace(-1, 1, 10)).sum().backward()
        grads = {n: p.grad.clone() for n, p in prepared.named_parameters() if p.grad is not None}
        return out.detach(), grads

    out_off, grads_off = run()
    for quantizer in switched_off:
        quantizer.mode = QUANTIZE
    out_on, grads_on = run()
    assert torch.equal(out_off, out_on)
    assert grads_off.keys() == grads_on.keys() and len(grads_on) >= 8
    for name, grad in grads_on.items():
        torch.testing.assert_close(grads_off[name], grad, rtol=0, atol=0, msg=name)
