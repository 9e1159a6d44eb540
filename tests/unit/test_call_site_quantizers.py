"""Quantizers placed per call site: a module called at several sites, tensor ops outside any
module (``+``, ``+=``, ``torch.cat``, ``F.relu``, functional pooling), and what ONNX Runtime then
runs on integer kernels. The unoptimized ONNX Runtime session (every QDQ node run as written, no
integer kernel) is the reference for what the exported graph computes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from workbench.engine.placement.call_sites import PerCallSite
from workbench.engine.placement.graph_quantizers import OutputQuantized
from workbench.engine.placement.op_kinds import OTHER, RELU, function_kind, module_kind
from workbench.runtime.ort_session import make_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class SharedReluBlock(nn.Module):
    """torchvision's BasicBlock: one ``self.relu`` called twice, ``out += identity``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class SharedReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(SharedReluBlock(8), SharedReluBlock(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.blocks(self.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FunctionalNet(nn.Module):
    """Functional ReLU / ReLU6, an add without a ReLU after it (MobileNetV2's residual), a
    concat, functional max / average pooling and ``view``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 1, 1)
        self.b = nn.Conv2d(8, 8, 3, 1, 1)
        self.d = nn.Conv2d(8, 8, 3, 1, 1)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.a(x))
        y = x + self.b(x)
        z = torch.cat([F.relu6(self.d(y)), y], dim=1)
        z = F.max_pool2d(self.c(z), 2)
        z = F.avg_pool2d(z, 2)
        return self.fc(z.view(z.shape[0], -1))


def _batches(seed: int, count: int = 2, size: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, size, size, generator=generator) for _ in range(count)]


def _ready(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        model(_batches(9, 1)[0])
    return model.eval()


def _unoptimized_ort(path, x: torch.Tensor) -> np.ndarray:
    session = make_session(path, 1, optimize=False)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def _kernels(fusion) -> dict[str, int]:
    return dict(zip(fusion.kernels["op_type"], fusion.kernels["count"], strict=True))


def test_a_module_called_twice_gets_a_quantizer_per_call_site(tmp_path):
    torch.manual_seed(0)
    model = _ready(SharedReluNet())
    before = copy.deepcopy(model.state_dict())
    result = wb.ptq(model, _batches(1), progress=False)
    for index in range(2):
        relu = result.model.blocks[index].relu
        assert isinstance(relu, PerCallSite) and len(relu.sites) == 2
        assert all(isinstance(site, OutputQuantized) for site in relu.sites)
        scales = [float(site.output_quantizer.scale) for site in relu.sites]
        assert scales[0] != scales[1]  # two tensors, two ranges
    assert type(model.blocks[0].relu) is nn.ReLU  # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    conv2 = result.model.blocks[1].conv1.input_quantizer
    assert conv2.shares_scale_of == "blocks.0.relu.sites.1.output_quantizer"

    x = _batches(3, 1)[0]
    path = result.export_onnx(tmp_path / "shared.onnx", x, check_fusion=False)
    kernels = _kernels(result.fusion(path, warn=False))
    assert kernels["QLinearAdd"] == 2 and kernels["QLinearConv"] == 5
    assert kernels["QLinearGlobalAveragePool"] == 1
    with torch.no_grad():
        simulated = result.model(x).numpy()
    assert _cosine(_unoptimized_ort(path, x), simulated) > 0.9999


def test_tensor_ops_are_quantized_at_their_call_sites(tmp_path):
    torch.manual_seed(0)
    result = wb.ptq(_ready(FunctionalNet()), _batches(1), progress=False)
    sites = result.model.quantization_sites.site_names
    assert {"add#0", "cat#0", "relu#0", "relu6#0", "avg_pool2d#0"} <= set(sites)
    x = _batches(3, 1)[0]
    path = result.export_onnx(tmp_path / "functional.onnx", x, check_fusion=False)
    fusion = result.fusion(path, warn=False)
    kernels = _kernels(fusion)
    assert kernels["QLinearAdd"] == 1 and kernels["QLinearConcat"] == 1
    rows = {row.op_type: row for row in fusion.ops.itertuples()}
    assert set(rows) == {"Add", "Concat", "MaxPool", "AveragePool"}
    assert rows["MaxPool"].kernel == "MaxPool (uint8)"
    assert rows["Concat"].site == "cat#0" and rows["Add"].site == "add#0"
    assert fusion.ops["fused"].all() and fusion.unfused_ops == []
    assert (
        result.report.extra_tables["ONNX Runtime fusion of adds, concats and pools"] is fusion.ops
    )
    assert kernels["QLinearAveragePool"] == 1 and kernels["QLinearConv"] == 4
    with torch.no_grad():
        simulated = result.model(x).numpy()
    assert _cosine(_unoptimized_ort(path, x), simulated) > 0.9999


def test_a_residual_add_between_float_ops_stays_float(tmp_path):
    """A transformer's ``x + attention(x)`` between LayerNorms: no input is on a grid, so
    quantizing around the add would only add work."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.linear = nn.Linear(16, 16)

        def forward(self, x):
            x = self.norm(x)
            return self.norm(x + self.linear(x))

    torch.manual_seed(0)
    result = wb.ptq(Residual().eval(), [torch.randn(8, 16)], progress=False)
    assert getattr(result.model, "quantization_sites", None) is None
    path = result.export_onnx(tmp_path / "residual.onnx", torch.randn(2, 16), check_fusion=False)
    add = result.fusion(path, warn=False).ops.iloc[0]
    assert not add["quantized"] and not add["fused"]
    assert add["reason"].startswith("input from LayerNormalization is not quantized")


def test_the_op_table_reads_relu_like_clamps():
    assert function_kind("hardtanh", (None, 0.0, 6.0)) is RELU
    assert function_kind("hardtanh", (None, -1.0, 1.0)) is OTHER
    assert function_kind("relu_") is RELU
    assert module_kind(nn.ReLU6()) is RELU and module_kind(nn.Hardtanh(-1, 1)) is OTHER
