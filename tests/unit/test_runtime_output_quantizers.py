"""Output quantizers placed from the data flow: where they go in the simulated model, and that
ONNX Runtime then runs every conv and residual add on integer kernels and computes what the
simulation computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.engine.placement.graph_quantizers import OutputQuantized, bias_scale_of
from workbench.engine.placement.layers import iter_quantized_layers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, in_place: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()
        self.in_place = in_place

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.in_place:
            out += identity  # same tensor object as conv2's output, a new version
            return self.relu2(out)
        return self.relu2(out + identity)


class TinyResNet(nn.Module):
    def __init__(self, in_place: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, 2, 2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.block1 = Block(8, 8, in_place=in_place)
        self.block2 = Block(8, 16, 2, in_place=in_place)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block2(self.block1(self.pool(self.relu(self.bn(self.stem(x))))))
        return self.fc(torch.flatten(self.avg(x), 1))


def tiny_resnet(in_place: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet(in_place)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    return model.eval()


def images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def sites(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, OutputQuantized)}


@pytest.mark.parametrize("in_place", [False, True])
def test_quantizers_sit_where_integer_kernels_need_them(in_place):
    result = wb.ptq(tiny_resnet(in_place), [images(16, 1)], progress=False)
    expected = {
        "relu",  # stem conv -> ReLU -> Q
        "block1.relu1",
        "block1.bn2",  # conv2 feeds the add: its quantizer takes the folded BN's slot
        "block1.relu2",  # add -> ReLU -> Q
        "block2.relu1",
        "block2.bn2",
        "block2.down.1",
        "block2.relu2",
        "avg",  # DQ -> GlobalAveragePool -> Q: QLinearGlobalAveragePool
    }
    assert sites(result.model) == expected
    layers = dict(iter_quantized_layers(result.model))
    shares = {name: layer.input_quantizer.shares_scale_of for name, layer in layers.items()}
    assert shares["block1.conv1"] == "relu.output_quantizer"  # through the max pool
    assert shares["block2.down.0"] == "block1.relu2.output_quantizer"
    assert shares["fc"] == "avg.output_quantizer"  # through torch.flatten
    source = result.model.get_submodule("block1.relu1").output_quantizer
    conv2 = layers["block1.conv2"].input_quantizer
    assert float(conv2.scale) == float(source.scale)
    assert int(conv2.zero_point) == int(source.zero_point) == 0


def test_biases_are_on_the_int32_grid():
    result = wb.ptq(tiny_resnet(), [images(16, 1)], progress=False)
    for name, layer in iter_quantized_layers(result.model):
        bias = layer.layer.bias.detach()
        scale = bias_scale_of(layer)
        assert torch.equal(torch.round(bias / scale) * scale, bias), name


def test_relu_between_linear_layers_gets_no_quantizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    result = wb.ptq(model, [torch.randn(32, 8)], progress=False)
    assert sites(result.model) == set()


def test_conv_without_bn_or_relu_holds_its_own_output_quantizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 2, 3))
    result = wb.ptq(model, [torch.randn(4, 3, 9, 9)], progress=False)
    layers = dict(iter_quantized_layers(result.model))
    assert all(layer.output_quantizer is not None for layer in layers.values())
    assert all(layer.output_quantizer.calibrated for layer in layers.values())


@pytest.mark.parametrize("in_place", [False, True])
def test_onnxruntime_fuses_every_conv_and_add_and_matches_the_simulation(
    tmp_path, in_place, ort_exact_int8
):
    batches = [images(16, 1), images(16, 2)]
    result = wb.ptq(tiny_resnet(in_place), batches, config=ort_exact_int8, progress=False)
    path = result.export_onnx(tmp_path / "tiny.onnx", images(2, 3), check_fusion=False)
    fusion = result.fusion(path)
    assert fusion.unfused == []
    kernels = dict(zip(fusion.kernels["op_type"], fusion.kernels["count"], strict=True))
    assert kernels["QLinearConv"] == 6 and kernels["QLinearAdd"] == 2
    parity = result.parity(path, images(32, 4), per_layer=True)
    row = parity.table.iloc[0]
    assert row["cosine"] > 0.9999
    assert row["max_diff_steps"] <= 4.0
    stem = parity.layers.set_index("layer").loc["relu"]  # space-to-depth stem: same integers
    assert stem["mismatch_fraction"] < 1e-3 and stem["max_diff_steps"] <= 1.0 + 1e-4
    assert np.isclose(row["cosine_ort_vs_fp32"], row["cosine_sim_vs_fp32"], atol=1e-3)
