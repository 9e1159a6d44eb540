"""transformers' Conv1D (GPT-2's projections, weight stored (in, out)) is quantized exactly as
the nn.Linear holding its transposed weight: the same scales (one per output feature, axis 1 of
the Conv1D's weight), the same simulation, the same report rows and storage, the same export
(W stored (in, out) behind an axis-1 DequantizeLinear, fused by ONNX Runtime)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import workbench as wb
from tests.unit.test_runtime_export import assert_matches, initializers, node_named, output_step
from workbench.engine.placement.layers import iter_quantized_layers
from workbench.runtime.ort_session import make_session, run_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Projections(nn.Module):
    """Two projections and a head, as Conv1D (GPT-2) or as nn.Linear (the reference)."""

    def __init__(self, layer_type: type[nn.Module]) -> None:
        super().__init__()
        make = (lambda i, o: Conv1D(o, i)) if layer_type is Conv1D else nn.Linear
        self.c_fc = make(12, 24)
        self.act = nn.GELU()
        self.c_proj = make(24, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c_proj(self.act(self.c_fc(x))))


def conv1d_and_linear_twins() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    conv1d = Projections(Conv1D)
    for module in (conv1d.c_fc, conv1d.c_proj):
        nn.init.normal_(module.weight, std=0.3)
        nn.init.normal_(module.bias, std=0.1)  # transformers starts Conv1D biases at zero
    linear = Projections(nn.Linear)
    with torch.no_grad():
        for name in ("c_fc", "c_proj"):
            getattr(linear, name).weight.copy_(getattr(conv1d, name).weight.t())
            getattr(linear, name).bias.copy_(getattr(conv1d, name).bias)
        linear.head.load_state_dict(conv1d.head.state_dict())
    return conv1d.eval(), linear.eval()


def batches(seed: int, count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, 12, generator=generator) for _ in range(count)]


CONFIGS = {
    "int8": wb.QuantConfig.preset("int8"),
    "int8-weight-only": wb.QuantConfig.preset("int8-weight-only"),
    "int4-weight-mse": wb.QuantConfig.preset("int4-weight", weight_observer="mse"),
    "asymmetric-per-tensor": wb.QuantConfig(weight=wb.Scheme(8, False, False)),
    "bias-correction": wb.QuantConfig.preset("int8", bias_correction=True),
    "adaround": wb.QuantConfig.preset(
        "int4-weight", weight_method="adaround", adaround_iterations=20
    ),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_conv1d_is_quantized_as_the_linear_with_its_transposed_weight(config):
    conv1d, linear = conv1d_and_linear_twins()
    before = copy.deepcopy(conv1d.state_dict())
    torch.manual_seed(5)  # whatever a method draws at random, both runs draw the same
    ours = wb.ptq(conv1d, batches(1), config=CONFIGS[config], progress=False)
    torch.manual_seed(5)
    reference = wb.ptq(linear, batches(1), config=CONFIGS[config], progress=False)

    x = batches(2, 1)[0]
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), reference.model(x), rtol=1e-5, atol=1e-6)
    ours_layers = dict(iter_quantized_layers(ours.model))
    reference_layers = dict(iter_quantized_layers(reference.model))
    assert list(ours_layers) == list(reference_layers) == ["c_fc", "c_proj", "head"]
    for name in ("c_fc", "c_proj"):
        a, b = ours_layers[name], reference_layers[name]
        torch.testing.assert_close(a.weight_quantizer.scale, b.weight_quantizer.scale)
        torch.testing.assert_close(a.quantized_weight(), b.quantized_weight())
    # the reports agree but for the type, which names the user's layer
    layers = ours.report.layers.set_index("layer")
    assert list(layers.loc[["c_fc", "c_proj"], "type"]) == ["Conv1D", "Conv1D"]
    assert (layers.loc[["c_fc", "c_proj"], "status"] == "quantized").all()
    reference_rows = reference.report.layers.set_index("layer")
    for column in ["status", "bits"]:  # text: equal
        assert list(layers[column]) == list(reference_rows[column])
    for column in ["num_scales", "weight_sqnr_db"]:  # numbers: equal to float rounding
        assert list(layers[column]) == pytest.approx(list(reference_rows[column]), rel=1e-4)
    storage = ours.report.storage.drop(columns="type")
    assert storage.equals(reference.report.storage.drop(columns="type"))
    # the user's model keeps its Conv1D layers and weights
    assert isinstance(conv1d.c_fc, Conv1D)
    for key, value in conv1d.state_dict().items():
        assert torch.equal(value, before[key])


def test_per_channel_scales_follow_the_output_features_axis_1():
    """Against PyTorch's own per-channel fake quantization on the Conv1D's (in, out) weight."""
    conv1d, _ = conv1d_and_linear_twins()
    result = wb.ptq(conv1d, batches(1), config="int8-weight-only", progress=False)
    layer = dict(iter_quantized_layers(result.model))["c_fc"]
    weight = conv1d.c_fc.weight.detach()  # (in, out) = (12, 24)
    scale = weight.abs().amax(dim=0) / 127  # one per output feature
    torch.testing.assert_close(layer.weight_quantizer.scale, scale)
    expected = torch.fake_quantize_per_channel_affine(
        weight, scale, torch.zeros(24, dtype=torch.int32), 1, -127, 127
    )
    torch.testing.assert_close(layer.quantized_weight().t(), expected)
    x = batches(3, 1)[0]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected + conv1d.c_fc.bias, rtol=1e-5, atol=1e-6)


def test_exclude_overrides_and_sensitivity_name_conv1d_layers():
    conv1d, _ = conv1d_and_linear_twins()
    four_bits = {"weight": wb.Scheme(4, True, True)}
    config = wb.QuantConfig(exclude=("c_proj",), overrides={"c_fc": four_bits})
    result = wb.ptq(conv1d, batches(1), config=config, progress=False)
    layers = result.report.layers.set_index("layer")
    assert layers.loc["c_proj", "status"] == "fp32"
    assert layers.loc["c_proj", "reason"] == "excluded by config"
    # shapes as the user's Conv1D holds its weight, (in, out), quantized or not
    assert layers.loc["c_fc", "weight_shape"] == (12, 24)
    assert layers.loc["c_proj", "weight_shape"] == (24, 12)
    assert layers.loc["c_fc", "weight_bits"] == 4
    quantized = dict(iter_quantized_layers(result.model))
    assert quantized["c_fc"].weight_quantizer.scheme.bits == 4
    assert "c_proj" not in quantized

    table = wb.sensitivity(conv1d, batches(1), progress=False).set_index("layer")
    assert table.loc["c_fc", "type"] == "Conv1D"


def test_qat_trains_the_conv1d_weight_as_a_linear():
    conv1d, _ = conv1d_and_linear_twins()
    target = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(4))
    data = [(x, target) for x in batches(1, 4)]
    result = wb.qat(
        conv1d, data, loss_fn=nn.MSELoss(), lr=1e-2, calib_data=batches(1), progress=False
    )
    layer = dict(iter_quantized_layers(result.model))["c_fc"]
    trained = layer.layer.weight.detach().t()
    assert trained.shape == conv1d.c_fc.weight.shape
    assert not torch.allclose(trained, conv1d.c_fc.weight)  # trained, in the copy only


KERNELS = {  # (rank, preset) -> (exported op, ONNX Runtime's kernel)
    (3, "int8"): ("MatMul", "MatMulIntegerToFloat"),
    (2, "int8"): ("Gemm", "QGemm"),  # with its INT32 bias
    (3, "int8-weight-only"): ("MatMul", "MatMulNBits"),
    # with its bias as Sub(-b): an Add would become an FP32 FusedGemm (MatMulAddFusion)
    (2, "int8-weight-only"): ("MatMul", "MatMulNBits"),
}


@pytest.mark.parametrize(("rank", "preset"), list(KERNELS))
def test_conv1d_exports_as_its_in_out_weight_and_fuses(tmp_path, rank, preset, ort_exact_int8):
    conv1d, _ = conv1d_and_linear_twins()
    data = batches(1) if rank == 3 else [b.reshape(-1, 12) for b in batches(1)]
    config = ort_exact_int8 if preset == "int8" else preset
    result = wb.ptq(conv1d, data, config=config, progress=False)
    path = result.export_onnx(tmp_path / "conv1d.onnx", data[0][:2], check_fusion=False)
    model = onnx.load(str(path))
    inits = initializers(model)
    op_type, kernel = KERNELS[rank, preset]
    for name in ("c_fc", "c_proj"):
        layer = dict(iter_quantized_layers(result.model))[name]
        codes = inits[f"{name}.weight_quantized"]
        assert codes.dtype == np.int8
        assert codes.shape == tuple(getattr(conv1d, name).weight.shape)  # Conv1D's (in, out)
        scale = layer.weight_quantizer.scale.detach()
        expected = torch.round(layer.quantized_weight().detach().t() / scale)
        np.testing.assert_array_equal(codes, expected.numpy())
        dq = node_named(model, f"{name}/weight_dequantize")
        assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
        assert node_named(model, name).op_type == op_type
    assert not any(node.op_type == "Transpose" for node in model.graph.node)

    fusion = result.fusion(path, warn=False)
    table = fusion.table.set_index("layer")
    assert fusion.unfused == [], fusion.table
    assert list(table.loc[["c_fc", "c_proj", "head"], "kernel"]) == [kernel] * 3

    x = batches(6, 1)[0] if rank == 3 else batches(6, 1)[0].reshape(-1, 12)
    with torch.no_grad():
        expected = result.model(x).numpy()
    step = output_step(result.model)
    assert_matches(run_session(make_session(path, 1, optimize=False), x)[0], expected, step)
    fused = run_session(make_session(path), x)[0].ravel()
    if preset == "int8":
        assert_matches(fused.reshape(expected.shape), expected, step)
    else:  # MatMulNBits at accuracy level 4 quantizes its input to int8 per block
        cosine = fused @ expected.ravel() / np.linalg.norm(fused) / np.linalg.norm(expected)
        assert cosine >= 0.999
