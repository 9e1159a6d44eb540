"""The embedded demo: a small CNN trained on scikit-learn's digits (8x8 images), offline.

``python -m workbench demo`` trains it in seconds, runs PTQ with every observer, prints FP32
against INT8 accuracy and the report tables, and writes an HTML report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, pooling, and a small classifier head: 8x8 digits, 10 classes."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * channels * 16, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc2(x)


@dataclass
class DigitsData:
    """Train / test split of sklearn's digits as float tensors in [0, 1], shape [N, 1, 8, 8]."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def train_loader(self, batch_size: int = 64, shuffle: bool = True) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        dataset = TensorDataset(self.train_x, self.train_y)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)

    def calib_batches(self, batches: int = 8, batch_size: int = 64) -> list[torch.Tensor]:
        return [self.train_x[i * batch_size : (i + 1) * batch_size] for i in range(batches)]


def load_digits_data(test_fraction: float = 0.25, seed: int = 0) -> DigitsData:
    """sklearn's bundled digits (1797 images), shuffled with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    split = int(len(labels) * (1 - test_fraction))
    return DigitsData(images[:split], labels[:split], images[split:], labels[split:])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    model.train(was_training)
    return 100.0 * float((predicted == labels).float().mean())


def train_digits_cnn(data: DigitsData | None = None, epochs: int = 8, seed: int = 0) -> nn.Module:
    """Train :class:`DigitsCNN` with Adam; about 97-99% test accuracy in a few seconds."""
    torch.manual_seed(seed)
    data = data or load_digits_data()
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for images, labels in data.train_loader():
            optimizer.zero_grad()
            loss_fn(model(images), labels).backward()
            optimizer.step()
    return model.eval()
