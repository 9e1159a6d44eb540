"""torchvision's CNN structures, re-typed (torchvision does not import beside the CPU torch
wheel here): the same module layout, the same forward code (a shared ``self.relu`` called
twice per ResNet block, ``out += identity``, ``torch.flatten``, functional
``adaptive_avg_pool2d``, squeeze-excitation with hardsigmoid, ``torch.cat``), random weights
and BatchNorm statistics set by a few forward passes in train mode.

Every builder takes ``width`` (a channel multiplier, 1.0 = the published network) so that tests
can run the same structure small.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def _channels(value: float, width: float, divisor: int = 8) -> int:
    value = value * width
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# ResNet (torchvision.models.resnet) ------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, layers: list[int], num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        self.inplanes = _channels(64, width)
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, _channels(64, width), layers[0])
        self.layer2 = self._make_layer(block, _channels(128, width), layers[1], stride=2)
        self.layer3 = self._make_layer(block, _channels(256, width), layers[2], stride=2)
        self.layer4 = self._make_layer(block, _channels(512, width), layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


# MobileNetV2 (torchvision.models.mobilenetv2) --------------------------------------------------
class Conv2dNormActivation(nn.Sequential):
    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, activation=nn.ReLU6) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, kernel=1))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    SETTINGS += ((6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        input_channel = _channels(32, width)
        self.last_channel = _channels(1280, max(1.0, width))
        features: list[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2)]
        for t, c, n, s in self.SETTINGS:
            output_channel = _channels(c, width)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.2), nn.Linear(self.last_channel, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


# MobileNetV3-Small (torchvision.models.mobilenetv3) ---------------------------------------------
class SqueezeExcitation(nn.Module):
    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(x)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._scale(x)
        return scale * x


class InvertedResidualV3(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, use_se, activation, stride) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if activation == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, kernel=1, activation=act))
        layers.append(
            Conv2dNormActivation(expanded, expanded, kernel, stride, expanded, activation=act)
        )
        if use_se:
            layers.append(SqueezeExcitation(expanded, _channels(expanded // 4, 1.0)))
        layers.append(Conv2dNormActivation(expanded, cout, kernel=1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNetV3Small(nn.Module):
    # input, kernel, expanded, output, SE, activation, stride
    SETTINGS = (
        (16, 3, 16, 16, True, "RE", 2),
        (16, 3, 72, 24, False, "RE", 2),
        (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1),
        (48, 5, 144, 48, True, "HS", 1),
        (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1),
        (96, 5, 576, 96, True, "HS", 1),
    )

    def __init__(self, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()

        def c(value: int) -> int:
            return _channels(value, width)

        layers: list[nn.Module] = [
            Conv2dNormActivation(3, c(16), stride=2, activation=nn.Hardswish)
        ]
        for cin, k, exp, cout, se, act, s in self.SETTINGS:
            layers.append(InvertedResidualV3(c(cin), k, c(exp), c(cout), se, act, s))
        last = c(96)
        layers.append(Conv2dNormActivation(last, 6 * last, kernel=1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last, 1024),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=0.2, inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# EfficientNet-B0-style (torchvision.models.efficientnet: MBConv, SiLU, SE) -----------------------
class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = cin * expand
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(Conv2dNormActivation(cin, hidden, kernel=1, activation=nn.SiLU))
        layers.append(
            Conv2dNormActivation(hidden, hidden, kernel, stride, hidden, activation=nn.SiLU)
        )
        se = SqueezeExcitation(hidden, max(1, cin // 4))
        se.activation, se.scale_activation = nn.SiLU(), nn.Sigmoid()
        layers.append(se)
        layers.append(Conv2dNormActivation(hidden, cout, kernel=1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x  # torchvision: stochastic depth (identity at inference), then +=
        return result


class EfficientNetB0(nn.Module):
    # expand, kernel, stride, in, out, layers
    SETTINGS = (
        (1, 3, 1, 32, 16, 1),
        (6, 3, 2, 16, 24, 2),
        (6, 5, 2, 24, 40, 2),
        (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3),
        (6, 5, 2, 112, 192, 4),
        (6, 3, 1, 192, 320, 1),
    )

    def __init__(self, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()

        def c(value: int) -> int:
            return _channels(value, width)

        layers: list[nn.Module] = [Conv2dNormActivation(3, c(32), stride=2, activation=nn.SiLU)]
        for expand, kernel, stride, cin, cout, count in self.SETTINGS:
            stage = []
            for i in range(count):
                cin_i = c(cin) if i == 0 else c(cout)
                stage.append(MBConv(cin_i, c(cout), expand, kernel, stride if i == 0 else 1))
            layers.append(nn.Sequential(*stage))
        layers.append(Conv2dNormActivation(c(320), 4 * c(320), kernel=1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(0.2, inplace=True), nn.Linear(4 * c(320), num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# VGG-11 (torchvision.models.vgg, configuration "A") --------------------------------------------
class VGG11(nn.Module):
    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int = 1000, width: float = 1.0, hidden: int = 4096) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = _channels(v, width)
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# DenseNet block (torchvision.models.densenet: _DenseLayer / _DenseBlock / _Transition) ------------
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        concated = torch.cat(inputs, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlockNet(nn.Module):
    """Stem, one dense block of ``layers`` layers (``torch.cat`` of every earlier feature map),
    a transition (BN, ReLU, 1x1 conv, average pool), global pooling and a classifier."""

    def __init__(self, layers: int = 4, growth: int = 16, stem: int = 32, classes: int = 10):
        super().__init__()
        self.conv0 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(stem)
        self.relu0 = nn.ReLU(inplace=True)
        self.denselayers = nn.ModuleList(
            DenseLayer(stem + i * growth, growth) for i in range(layers)
        )
        channels = stem + layers * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels // 2, 1, bias=False),
            nn.AvgPool2d(2, 2),
        )
        self.classifier = nn.Linear(channels // 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.relu0(self.norm0(self.conv0(x)))]
        for layer in self.denselayers:
            features.append(layer(features))
        out = self.transition(torch.cat(features, 1))
        out = F.adaptive_avg_pool2d(F.relu(out), (1, 1))
        return self.classifier(torch.flatten(out, 1))


# small U-Net -----------------------------------------------------------------------------------
class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class SmallUNet(nn.Module):
    """Two down steps (max pool), a bottleneck, one ConvTranspose2d up step and one
    bilinear-upsample up step, each joined to its skip with ``torch.cat``."""

    def __init__(self, channels: int = 16, classes: int = 2) -> None:
        super().__init__()
        c = channels
        self.inc = DoubleConv(3, c)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(c, 2 * c))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(2 * c, 4 * c))
        self.up1 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.conv1 = DoubleConv(4 * c, 2 * c)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv2 = DoubleConv(3 * c, c)
        self.outc = nn.Conv2d(c, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.conv1(torch.cat([x2, self.up1(x3)], dim=1))
        y = self.conv2(torch.cat([x1, self.up2(y)], dim=1))
        return self.outc(y)


# builders --------------------------------------------------------------------------------------
def _ready(model: nn.Module, size: int, seed: int) -> nn.Module:
    """Kaiming-initialised convs and BatchNorm statistics set by train-mode passes; eval mode."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size, generator=generator))
    return model.eval()


def _build(factory: Callable[[], nn.Module], size: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _ready(factory(), size, seed)


def resnet18(width: float = 1.0, size: int = 224, classes: int = 1000, seed: int = 0):
    return _build(partial(ResNet, BasicBlock, [2, 2, 2, 2], classes, width), size, seed)


def resnet50(width: float = 1.0, size: int = 224, classes: int = 1000, seed: int = 0):
    return _build(partial(ResNet, Bottleneck, [3, 4, 6, 3], classes, width), size, seed)


def mobilenet_v2(width: float = 1.0, size: int = 224, classes: int = 1000, seed: int = 0):
    return _build(partial(MobileNetV2, classes, width), size, seed)


def mobilenet_v3_small(width: float = 1.0, size: int = 224, classes: int = 1000, seed: int = 0):
    return _build(partial(MobileNetV3Small, classes, width), size, seed)


def efficientnet_b0(width: float = 1.0, size: int = 224, classes: int = 1000, seed: int = 0):
    return _build(partial(EfficientNetB0, classes, width), size, seed)


def vgg11(width: float = 1.0, size: int = 224, classes: int = 1000, seed: int = 0, hidden=4096):
    return _build(partial(VGG11, classes, width, hidden), size, seed)


def densenet_block(size: int = 32, seed: int = 0):
    return _build(DenseBlockNet, size, seed)


def small_unet(size: int = 32, seed: int = 0):
    return _build(SmallUNet, size, seed)


def images(count: int, size: int = 224, batch: int = 1, seed: int = 1) -> list[torch.Tensor]:
    """Random images, normalised like ImageNet inputs."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=generator) for _ in range(count)]
