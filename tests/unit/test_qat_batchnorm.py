"""BatchNorm during QAT: the live conv-BN against torch's batch_norm, and what is trained is
what is exported (the live layer in eval mode equals the folded layer bit for bit)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from workbench.engine.calibration.calibrate import calibrate, finish_calibration, prepare_model
from workbench.engine.capture.bn_fold import BN_TYPES
from workbench.engine.placement.layers import QuantizedLayer
from workbench.engine.quantizers.qat import enable_qat
from workbench.engine.training.live_bn import (
    QuantizedConvBn,
    folded_pairs,
    freeze_batchnorms,
    set_training_mode,
    unfold_batchnorms,
)


class ConvBnNet(nn.Module):
    """conv-BN-ReLU, a BN that follows no conv (never folded), and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(1)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.relu(self.bn(self.conv(self.input_bn(x))))))


def trained_net(seed: int = 0) -> ConvBnNet:
    """A net whose BatchNorms hold non-trivial running statistics and affine parameters."""
    torch.manual_seed(seed)
    net = ConvBnNet()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.3, 0.3)
    net.train()
    for _ in range(20):
        net(torch.randn(16, 1, 6, 6) * 2 + 0.5)
    return net.eval()


def live_model(net: nn.Module, config: wb.QuantConfig, learn: bool = False):
    calib = [torch.randn(16, 1, 6, 6) * 2 + 0.5 for _ in range(2)]
    _, prepared, plans = prepare_model(net, calib[0], config)
    finish_calibration(prepared, plans, calibrate(prepared, calib, progress=False))
    assert unfold_batchnorms(prepared, net, plans) == ["conv"]
    enable_qat(prepared, learn_scales=learn)
    return prepared


def test_folded_pairs_come_from_the_plan_field_not_from_the_rendered_reason():
    net = trained_net()
    _, _, plans = prepare_model(net, torch.randn(4, 1, 6, 6), wb.QuantConfig.preset("int8"))
    by_name = {plan.name: plan for plan in plans}
    assert by_name["bn"].folded_into == "conv"
    assert by_name["bn"].reason == "folded into conv"
    assert by_name["input_bn"].folded_into is None  # follows no conv: kept, not folded
    assert folded_pairs(plans) == [("conv", "bn")]
    by_name["bn"].note = "a reworded note"  # prose never decides what is folded
    by_name["input_bn"].note = "folded into conv"
    assert folded_pairs(plans) == [("conv", "bn")]


def test_live_conv_bn_trains_with_batch_statistics_as_torch_batch_norm():
    net = trained_net()
    config = wb.QuantConfig(activation=None)  # weight-only: the reference needs no activations
    model = live_model(net, config)
    layer = model.conv
    assert isinstance(layer, QuantizedConvBn)
    set_training_mode(model, bn_frozen=False)
    x = torch.randn(8, 1, 6, 6)
    out = layer(x)

    # reference: the PyTorch / TensorRT recipe written with torch ops
    bn = net.bn
    std = torch.sqrt(bn.running_var + bn.eps)
    factor = bn.weight.detach() / std
    folded = net.conv.weight.detach() * factor.reshape(-1, 1, 1, 1)
    w_scale = folded.abs().amax(dim=(1, 2, 3)) / 127
    w_q = torch.fake_quantize_per_channel_affine(
        folded, w_scale, torch.zeros(4, dtype=torch.int32), 0, -128, 127
    )
    y = F.conv2d(x, w_q, None, padding=1) / factor.reshape(1, -1, 1, 1)
    y = y + net.conv.bias.detach().reshape(1, -1, 1, 1)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    ref = F.batch_norm(
        y,
        running_mean,
        running_var,
        bn.weight.detach(),
        bn.bias.detach(),
        True,
        bn.momentum,
        bn.eps,
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bn.running_mean, running_mean)
    torch.testing.assert_close(layer.bn.running_var, running_var)
    assert not torch.allclose(layer.bn.running_mean, bn.running_mean)  # statistics moved


def test_live_layer_in_eval_mode_is_the_folded_layer_it_exports():
    net = trained_net(1)
    model = live_model(net, wb.QuantConfig.preset("int8"))
    set_training_mode(model, bn_frozen=False)
    with torch.no_grad():
        for _ in range(5):  # statistics drift away from the ones folded at calibration
            model(torch.randn(16, 1, 6, 6) * 3 + 1.0)
    model.eval()
    x = torch.randn(8, 1, 6, 6) * 2 + 0.5
    with torch.no_grad():
        live = model(x)
        bn = copy.deepcopy(model.conv.bn)
        conv = copy.deepcopy(model.conv.layer)
        folded_model = freeze_batchnorms(model)
        folded = folded_model(x)
    assert type(folded_model.conv) is QuantizedLayer
    torch.testing.assert_close(live, folded, rtol=1e-5, atol=1e-5)
    # the folded weight is W * gamma / sqrt(running_var + eps) of the updated statistics
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(
        folded_model.conv.layer.weight, conv.weight * factor.reshape(-1, 1, 1, 1)
    )
    expected_bias = (conv.bias - bn.running_mean) * factor + bn.bias
    torch.testing.assert_close(folded_model.conv.layer.bias, expected_bias)


def test_bn_statistics_update_only_until_frozen():
    net = trained_net(2)
    model = live_model(net, wb.QuantConfig.preset("int8"))
    before = model.input_bn.running_mean.clone()
    set_training_mode(model, bn_frozen=False)
    with torch.no_grad():
        model(torch.randn(16, 1, 6, 6) + 3.0)
    moved = model.input_bn.running_mean.clone()
    assert not torch.allclose(moved, before)
    model = freeze_batchnorms(model)
    set_training_mode(model, bn_frozen=True)
    with torch.no_grad():
        model(torch.randn(16, 1, 6, 6) + 3.0)
    torch.testing.assert_close(model.input_bn.running_mean, moved)
    assert not any(isinstance(m, QuantizedConvBn) for m in model.modules())


def batches(seed: int, count: int = 6):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 1, 6, 6, generator=generator) * 2 + 0.5, torch.randint(0, 3, (16,)))
        for _ in range(count)
    ]


def test_qat_freezes_bn_after_the_asked_steps_and_exports_a_folded_model():
    net = trained_net(3)
    result = wb.qat(
        net,
        batches(0),
        loss_fn=nn.CrossEntropyLoss(),
        epochs=2,
        lr=1e-3,
        freeze_bn_after=4,
        progress=False,
    )
    assert result.extras["bn_frozen_at_step"] == 4
    assert result.report.summary["qat_bn_frozen_at_step"] == 4
    modules = list(result.model.modules())
    assert not any(isinstance(m, QuantizedConvBn) for m in modules)
    # only the BN that follows no conv is left, and it kept the statistics of step 4
    assert [type(m) for m in modules if isinstance(m, BN_TYPES)] == [nn.BatchNorm2d]
    assert not torch.allclose(result.model.input_bn.running_mean, net.input_bn.running_mean)


def test_qat_with_bn_folded_from_the_start_never_moves_bn_statistics():
    net = trained_net(4)
    result = wb.qat(net, batches(1), loss_fn=nn.CrossEntropyLoss(), lr=1e-3, progress=False)
    assert result.extras["bn_frozen_at_step"] == 0
    torch.testing.assert_close(result.model.input_bn.running_mean, net.input_bn.running_mean)
    torch.testing.assert_close(result.model.input_bn.running_var, net.input_bn.running_var)
