"""Fake quantization gradients: the straight-through estimator and LSQ's learned scale."""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.core import fake_quantize, fake_quantize_learned_scale


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ste_gradient_is_one_inside_and_zero_outside(symmetric, per_channel, bits):
    scheme = wb.Scheme(bits, symmetric=symmetric, per_channel=per_channel, axis=1)
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 3, 50, generator=generator) * 2.0
    channels = 3 if per_channel else 1
    scale = torch.linspace(0.02, 0.05, channels) if per_channel else torch.tensor(0.03)
    zero_point = torch.full_like(scale, scheme.quant_min + scheme.levels // 3, dtype=torch.int32)
    if symmetric:
        zero_point.zero_()
    x.requires_grad_(True)
    out = fake_quantize(x, scale, zero_point, scheme)
    out.backward(torch.ones_like(out))

    shape = [1, -1, 1] if per_channel else []
    s, z = scale.reshape(shape), zero_point.reshape(shape).float()
    codes = torch.round(x.detach() / s) + z
    inside = (codes >= scheme.quant_min) & (codes <= scheme.quant_max)
    # away from rounding ties, where x / s and x * (1 / s) might round differently (the
    # clamp edges sit at ties too)
    ratio = x.detach() / s
    margin = (ratio - torch.round(ratio)).abs() < 0.49
    assert inside[margin].any() and (~inside[margin]).any()
    assert torch.equal(x.grad[margin], inside[margin].float())


def test_ste_gradient_passes_upstream_gradient_through():
    scheme = wb.Scheme(8, symmetric=False)
    x = torch.linspace(-1.0, 3.0, 401, requires_grad=True)
    upstream = torch.randn(401)
    out = fake_quantize(x, torch.tensor(0.01), torch.tensor(100, dtype=torch.int32), scheme)
    out.backward(upstream)
    inside = (x.detach() >= -1.0 + 1e-6) & (x.detach() <= 1.55 - 1e-6)
    torch.testing.assert_close(x.grad[inside], upstream[inside])
    assert bool((x.grad[x.detach() > 1.6] == 0).all())


def lsq_case(per_channel: bool, symmetric: bool):
    """float64 inputs whose x / s sit away from rounding ties and from the clamp edges."""
    generator = torch.Generator().manual_seed(11)
    scheme = wb.Scheme(4, symmetric=symmetric, per_channel=per_channel, axis=0)
    channels = 4 if per_channel else 1
    scale = torch.linspace(0.1, 0.25, channels, dtype=torch.float64)
    if not per_channel:
        scale = scale[0].reshape(())
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    if not symmetric:
        zero_point += 5
    s = scale.reshape(-1, 1) if per_channel else scale
    z = zero_point.reshape(-1, 1).double() if per_channel else zero_point.double()
    # codes: integer + fraction in [-0.35, 0.35]; some far outside the range (clamped)
    integers = torch.randint(-14, 15, (channels, 40), generator=generator).double()
    fractions = (torch.rand(channels, 40, generator=generator, dtype=torch.float64) - 0.5) * 0.7
    codes = integers + fractions
    near_edge = ((integers + z - scheme.quant_min).abs() <= 1) | (
        (integers + z - scheme.quant_max).abs() <= 1
    )
    codes = torch.where(near_edge, codes + 3.0 * torch.sign(codes + 1e-9), codes)
    x = codes * s
    if not per_channel:
        x = x.reshape(-1)
    return x, scale, zero_point, scheme


def lsq_surrogate(x, scale, zero_point, scheme, residual, per_channel):
    """LSQ's function of the scale: round(v) replaced by v + (round(v0) - v0) held constant
    (the straight-through estimator), so its derivative is LSQ's gradient."""
    s = scale.reshape(-1, 1) if per_channel else scale
    z = zero_point.reshape(-1, 1).double() if per_channel else zero_point.double()
    codes = torch.clamp(x / s + residual + z, scheme.quant_min, scheme.quant_max)
    return ((codes - z) * s).sum()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_scale_gradient_matches_finite_difference(per_channel, symmetric):
    x, scale, zero_point, scheme = lsq_case(per_channel, symmetric)
    learned = scale.clone().requires_grad_(True)
    out = fake_quantize_learned_scale(x, learned, zero_point, scheme, grad_factor=1.0)
    out.sum().backward()

    s = scale.reshape(-1, 1) if per_channel else scale
    residual = torch.round(x / s) - x / s
    assert float(residual.abs().max()) < 0.36  # away from ties
    # the surrogate has the forward's value at the scale itself
    torch.testing.assert_close(
        lsq_surrogate(x, scale, zero_point, scheme, residual, per_channel), out.sum()
    )
    eps = 1e-6
    numeric = torch.zeros_like(scale)
    for index in range(scale.numel()):
        up, down = scale.clone(), scale.clone()
        up.view(-1)[index] += eps
        down.view(-1)[index] -= eps
        f_up = lsq_surrogate(x, up, zero_point, scheme, residual, per_channel)
        f_down = lsq_surrogate(x, down, zero_point, scheme, residual, per_channel)
        numeric.view(-1)[index] = (f_up - f_down) / (2 * eps)
    torch.testing.assert_close(learned.grad, numeric, rtol=1e-6, atol=1e-6)


def test_lsq_matches_torch_learnable_fake_quant():
    """Forward and both gradients against PyTorch's own LSQ kernel (float32 only)."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1000, generator=generator) * 0.7
    scheme = wb.Scheme(8, symmetric=False)
    scale = torch.tensor(0.0042)
    grad_factor = 1.0 / (1000 * 255) ** 0.5

    ours_x = x.clone().requires_grad_(True)
    ours_s = scale.clone().requires_grad_(True)
    out = fake_quantize_learned_scale(
        ours_x, ours_s, torch.tensor(120, dtype=torch.int32), scheme, grad_factor
    )
    upstream = torch.randn(1000, generator=generator)
    out.backward(upstream)

    ref_x = x.clone().requires_grad_(True)
    ref_s = scale.reshape(1).clone().requires_grad_(True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(
        ref_x, ref_s, torch.tensor([120.0]), 0, 255, grad_factor
    )
    ref.backward(upstream)
    # torch divides by the scale where we multiply by its inverse: allow one step at a tie
    assert float((out - ref).detach().abs().max()) <= float(scale) * 1.001
    assert float((out != ref).float().mean().detach()) < 0.01
    torch.testing.assert_close(ours_x.grad, ref_x.grad)
    torch.testing.assert_close(ours_s.grad.reshape(1), ref_s.grad, rtol=1e-4, atol=1e-7)


def test_lsq_default_grad_factor():
    scheme = wb.Scheme(8, symmetric=True)
    x = torch.randn(64, dtype=torch.float64)
    scale = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    fake_quantize_learned_scale(x, scale, torch.tensor(0), scheme).sum().backward()
    scaled_grad = scale.grad.clone()
    scale.grad = None
    fake_quantize_learned_scale(x, scale, torch.tensor(0), scheme, 1.0).sum().backward()
    torch.testing.assert_close(scaled_grad, scale.grad / (64 * 127) ** 0.5)
