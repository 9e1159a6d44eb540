"""Analytic (data-free) bias correction: the expected input of a layer after BatchNorm ->
ReLU / ReLU6 follows from the BatchNorm's beta and gamma, and the bias moves by
``-(W_q - W) E[x]``. Checked on a conv whose input really is Gaussian with those statistics
(1x1 conv of standard normal pixels, BatchNorm running statistics set to the conv's true
output mean and variance), against an independent integral and conv, and against the
empirical correction measured on many samples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from workbench.engine.placement.graph_quantizers import bias_scale_of
from workbench.engine.placement.layers import iter_quantized_layers

IN_CHANNELS, CHANNELS, OUT_CHANNELS = 3, 6, 5


class GaussianInputNet(nn.Module):
    """conv1 (1x1) -> BatchNorm -> ReLU / ReLU6 -> conv2 (3x3, no padding)."""

    def __init__(self, activation: nn.Module, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(IN_CHANNELS, CHANNELS, 1)
        self.bn = nn.BatchNorm2d(CHANNELS)
        self.act = activation
        self.conv2 = nn.Conv2d(CHANNELS, OUT_CHANNELS, 3)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
            # conv1's output channel c is N(b_c, |w_c|^2) for standard normal pixels: the
            # BatchNorm's running statistics are its true ones, so its output is N(beta, gamma^2)
            self.bn.running_mean.copy_(self.conv1.bias)
            self.bn.running_var.copy_(self.conv1.weight.pow(2).sum(dim=(1, 2, 3)) - self.bn.eps)
            self.bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5, 2.5]))
            self.bn.bias.copy_(torch.tensor([0.5, -1.0, 0.2, 4.0, -0.3, 5.0]))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn(self.conv1(x))))


def _config(**options) -> wb.QuantConfig:
    # weight-only, per-tensor 4-bit: the weights' rounding is the only error; conv1 stays FP32
    # so that conv2 sees the same input in the quantized model
    return wb.QuantConfig(
        weight=wb.Scheme(4, True, False), activation=None, exclude=("conv1",), **options
    )


def _bias_shift(result) -> torch.Tensor:
    layer = dict(iter_quantized_layers(result.model))["conv2"]
    return (result.fp32_model.conv2.bias - layer.layer.bias).detach().to(torch.float64)


def _expected_by_integral(beta: torch.Tensor, gamma: torch.Tensor, upper: float) -> torch.Tensor:
    """E[min(max(y, 0), upper)] for y ~ N(beta, gamma^2) by the trapezoid rule on a fine grid."""
    beta, sigma = beta.to(torch.float64), gamma.abs().to(torch.float64)
    means = []
    for mu, s in zip(beta, sigma, strict=True):
        y = torch.linspace(float(mu - 12 * s), float(mu + 12 * s), 200_001, dtype=torch.float64)
        density = torch.exp(-0.5 * ((y - mu) / s) ** 2) / (s * (2 * torch.pi) ** 0.5)
        means.append(torch.trapezoid(y.clamp(0.0, upper) * density, y))
    return torch.stack(means)


@pytest.mark.parametrize(("activation", "upper"), [(nn.ReLU(), float("inf")), (nn.ReLU6(), 6.0)])
def test_analytic_shift_is_the_weight_error_times_the_expected_input(activation, upper):
    model = GaussianInputNet(activation)
    batches = [torch.randn(4, IN_CHANNELS, 6, 6, generator=torch.Generator().manual_seed(1))]
    result = wb.ptq(model, batches, config=_config(bias_correction="analytic"), progress=False)

    expected_input = _expected_by_integral(model.bn.bias.detach(), model.bn.weight.detach(), upper)
    layer = dict(iter_quantized_layers(result.model))["conv2"]
    weight_error = (layer.quantized_weight() - layer.weight).detach().to(torch.float64)
    constant = expected_input.reshape(1, -1, 1, 1).expand(1, CHANNELS, 3, 3)
    independent = F.conv2d(constant, weight_error).reshape(-1)  # (W_q - W) E[x], no bias
    assert float(independent.abs().max()) > 1e-2  # the case is not trivial
    torch.testing.assert_close(_bias_shift(result), independent, rtol=1e-4, atol=1e-6)

    plans = {plan.name: plan for plan in result.plans}
    assert plans["conv2"].bias_corrected and not plans["conv1"].bias_corrected
    torch.testing.assert_close(plans["conv1"].output_mean, model.bn.bias.detach())
    torch.testing.assert_close(plans["conv1"].output_std, model.bn.weight.detach().abs())
    assert result.report.summary["ptq_methods"] == ["analytic bias correction"]


@pytest.mark.parametrize("equalize", [False, True])
@pytest.mark.parametrize("activation", [nn.ReLU(), nn.ReLU6()])
def test_analytic_correction_approaches_the_empirical_one_on_gaussian_inputs(activation, equalize):
    model = GaussianInputNet(activation, seed=3)
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(512, IN_CHANNELS, 10, 10, generator=generator) for _ in range(4)]
    analytic = wb.ptq(
        model,
        batches,
        config=_config(bias_correction="analytic", equalize=equalize),
        progress=False,
    )
    empirical = wb.ptq(
        model,
        batches,
        config=_config(bias_correction="empirical", equalize=equalize),
        progress=False,
    )
    analytic_shift, empirical_shift = _bias_shift(analytic), _bias_shift(empirical)
    # the empirical shift is (W_q - W) times the sample mean of 2e5 values per channel
    assert float(empirical_shift.abs().max()) > 5e-2
    assert float((analytic_shift - empirical_shift).abs().max()) < 0.02 * float(
        empirical_shift.abs().max()
    )
    assert {p.name for p in analytic.plans if p.equalized} == (
        {"conv1", "conv2"} if equalize else set()
    )


def test_a_layer_without_batchnorm_statistics_before_it_is_left_as_it_is():
    model = GaussianInputNet(nn.ReLU())
    batches = [torch.randn(4, IN_CHANNELS, 6, 6, generator=torch.Generator().manual_seed(1))]
    config = wb.QuantConfig(weight=wb.Scheme(4, True, False), bias_correction="analytic")
    result = wb.ptq(model, batches, config=config, progress=False)
    plans = {plan.name: plan for plan in result.plans}
    # conv1 reads the image (no BatchNorm before it); conv2 follows the folded BatchNorm
    assert not plans["conv1"].bias_corrected and plans["conv2"].bias_corrected
    layer = dict(iter_quantized_layers(result.model))["conv1"]
    moved = (layer.layer.bias - result.fp32_model.conv1.bias).abs()
    assert bool((moved <= bias_scale_of(layer) / 2 * 1.001).all())  # only the INT32 rounding
