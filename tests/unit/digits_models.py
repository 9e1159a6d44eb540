"""Tiny models trained on sklearn's digits in milliseconds, for the notebook front-end tests."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from workbench.demo import load_digits_data


def _fit(model: nn.Module, steps: int) -> nn.Module:
    """A few full-batch Adam steps on the digits training split; returns the model in eval."""
    data = load_digits_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.train_x), data.train_y).backward()
        optimizer.step()
    return model.eval()


def tiny_mlp() -> nn.Module:
    """A 64-32-10 MLP on digits, trained for a few full-batch Adam steps (milliseconds)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(), fc1=nn.Linear(64, 32), relu=nn.ReLU(), fc2=nn.Linear(32, 10)
        )
    )
    return _fit(model, steps=40)


def tiny_cnn() -> nn.Module:
    """Conv-BN-ReLU, pooling and two Linear layers on digits; a few full-batch Adam steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 4, 3, padding=1),
            bn=nn.BatchNorm2d(4),
            relu1=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(64, 32),
            relu2=nn.ReLU(),
            fc2=nn.Linear(32, 10),
        )
    )
    return _fit(model, steps=30)
