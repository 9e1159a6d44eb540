"""Benchmark models built in code (nothing is downloaded).

* :func:`resnet18_shaped` — the ResNet-18 layout (BasicBlocks with BatchNorm and residual
  adds, 11.7M parameters) for 224x224 images, written out here so no torchvision is needed.
  Every ReLU is its own module, as in a model written for quantization.
* :func:`bert_encoder` — a randomly initialised ``transformers`` BertModel from a BertConfig.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN, a residual add (1x1 conv-BN on the shortcut when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet18Shaped(nn.Module):
    """ResNet-18: stem conv 7x7 / max pool, four stages of two BasicBlocks, average pool, fc."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        in_channels = 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels)
                )
            )
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet18_shaped(seed: int = 0) -> nn.Module:
    """A ResNet-18-shaped CNN in eval mode with non-trivial BatchNorm statistics.

    Random weights with Kaiming init; the BatchNorm running statistics are set by a few
    forward passes in train mode so that folding them is not a no-op.
    """
    torch.manual_seed(seed)
    model = ResNet18Shaped()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 224, 224))
    return model.eval()


def image_batches(count: int, batch: int = 1, seed: int = 1) -> list[torch.Tensor]:
    """Random 224x224 images, normalised like ImageNet inputs."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 224, 224, generator=generator) for _ in range(count)]


def bert_encoder(
    layers: int = 6, hidden: int = 384, heads: int = 12, intermediate: int = 1536, seed: int = 0
) -> nn.Module:
    """A randomly initialised BertModel (eager attention, eval mode)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=512,
    )
    config._attn_implementation = "eager"
    return BertModel(config, add_pooling_layer=False).eval()


def token_batches(
    count: int, batch: int = 32, seq: int = 64, vocab: int = 30522, seed: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Random token ids with a full attention mask, as a tokenizer's output."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, vocab, (batch, seq), generator=generator),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }
        for _ in range(count)
    ]


def print_checks(checks: list[tuple[str, float, bool]], digits: int = 3) -> int:
    """Print each target as PASS / FAIL with its measured value; exit code 0 when all pass."""
    for label, value, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {label}: {value:.{digits}f}")
    return 0 if all(ok for *_, ok in checks) else 1


def machine_line() -> str:
    """The line every benchmark prints first (``workbench.runtime.cpu_features.machine_line``:
    CPU, cores, load, AVX2 / AVX-512 / VNNI / AMX)."""
    from workbench.runtime.cpu_features import machine_line as line

    return line()


def ort_quantize_static(fp32_path: Path, out_path: Path, calib: list) -> Path:
    """ONNX Runtime's recommended static flow: quant_pre_process, then quantize_static (QDQ,
    per-channel int8 weights, uint8 activations, MinMax calibration on the same images)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepared))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x.numpy()} for x in calib])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(prepared),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out_path
