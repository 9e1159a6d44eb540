"""Small models for the PTQ refinement tests: built in code, channel ranges made uneven so
that equalization and rounding have something to do."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def uneven_channels(model: nn.Module, seed: int = 0) -> nn.Module:
    """Scale each conv / linear output channel by a random factor in [0.05, 20] and give
    every BatchNorm non-trivial statistics; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                factors = torch.exp(
                    torch.empty(module.weight.shape[0]).uniform_(-3, 3, generator=generator)
                )
                module.weight.mul_(factors.reshape([-1] + [1] * (module.weight.dim() - 1)))
            if isinstance(module, nn.BatchNorm2d):
                count = module.num_features
                module.running_mean.copy_(torch.randn(count, generator=generator))
                module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(count, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(count, generator=generator) + 1.0)
    return model.eval()


class InvertedResidualNet(nn.Module):
    """Conv-BN-ReLU6, depthwise conv-BN-ReLU6, pointwise conv, a residual add, then a
    Linear -> ReLU -> Linear head (F.relu between 1x1 convs, as a functional call)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(1, 8, 3, padding=1), bn=nn.BatchNorm2d(8), act=nn.ReLU6())
        )
        self.expand = nn.Conv2d(8, 16, 1)
        self.expand_act = nn.ReLU6()
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(16)
        self.depthwise_act = nn.ReLU6()
        self.project = nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.mix2 = nn.Conv2d(8, 8, 1)
        self.pool = nn.AvgPool2d(4)
        self.fc1 = nn.Linear(32, 24)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.depthwise_act(self.depthwise_bn(self.depthwise(self.expand_act(self.expand(x)))))
        x = x + self.project(y)
        x = self.mix2(torch.relu(self.mix(x)))
        x = self.pool(x).flatten(1)
        return self.fc2(self.relu(self.fc1(x)))


def inverted_residual_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return uneven_channels(InvertedResidualNet(), seed)
