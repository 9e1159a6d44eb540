"""The INT8 ONNX export holds exactly the simulated model's integers, scales and zero points, in
the layout ONNX Runtime fuses, and computes what the simulation computes (checked with
onnx.reference and ONNX Runtime)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import workbench as wb
from workbench.engine.placement.layers import iter_quantized_layers
from workbench.errors import ExportError
from workbench.runtime.ort_session import make_session, run_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.bn(self.conv(x))))))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN()
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8))  # non-trivial BatchNorm statistics to fold
    return model.eval()


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if tensor in node.output)


def reference_run(path, x: torch.Tensor) -> np.ndarray:
    """onnx.reference's output; its QuantizeLinear / DequantizeLinear start at opset 19, whose
    semantics for int8 / uint8 are those of opset 13-17, so the copy declares 19."""
    model = onnx.load(str(path))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 19)
    return ReferenceEvaluator(model).run(None, {"input": x.numpy()})[0]


def output_step(model: nn.Module, name: str | None = None) -> float:
    """How far the output moves when one code at layer ``name``'s quantizers (default: the
    last quantized layer, which feeds the output) moves by one quantization step: its output
    quantizer's scale, or its input scale times the largest |weight| that input meets; 0 for
    a weight-only layer, whose codes are fixed."""
    layers = dict(iter_quantized_layers(model))
    layer = layers[name] if name is not None else list(layers.values())[-1]
    if layer.output_quantizer is not None:
        return float(layer.output_quantizer.scale.max())
    if layer.input_quantizer is None:
        return 0.0
    return float(layer.input_quantizer.scale.max() * layer.quantized_weight().abs().max())


def assert_matches(actual: np.ndarray, expected: np.ndarray, step: float) -> None:
    """Equal up to float rounding, except where float and integer arithmetic round a tie at a
    quantizer differently: then a few values move by about one quantization step ``step`` of
    the output (see output_step), never more than two."""
    assert actual.shape == expected.shape
    float_rounding = 1e-4 * max(1.0, float(np.abs(expected).max()))
    difference = np.abs(actual - expected)
    assert (difference <= float_rounding).mean() >= 0.99
    assert difference.max() <= 2.0 * step + float_rounding, (difference.max(), step)


def simulated(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


@pytest.fixture(scope="module")
def mlp_export(tmp_path_factory, ort_exact_int8):
    data = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    result = wb.ptq(mlp(), [data[:32], data[32:]], config=ort_exact_int8, progress=False)
    path = tmp_path_factory.mktemp("mlp") / "mlp_int8.onnx"
    result.export_onnx(path, data[:4], check_fusion=False)
    return result, onnx.load(str(path)), path


def test_linear_weights_are_the_simulated_codes_transposed(mlp_export):
    result, model, _ = mlp_export
    inits = initializers(model)
    for name, layer in iter_quantized_layers(result.model):
        scale = layer.weight_quantizer.scale.detach()
        expected = torch.round(layer.quantized_weight().detach() / scale[:, None]).to(torch.int8)
        codes = inits[f"{name}.weight_quantized"]
        assert codes.dtype == np.int8
        np.testing.assert_array_equal(codes, expected.numpy().T)  # stored as W^T [in, out]
        np.testing.assert_array_equal(inits[f"{name}.weight_scale"], scale.numpy())
        dq = node_named(model, f"{name}/weight_dequantize")
        assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
        target = node_named(model, name)
        assert target.op_type in ("MatMul", "Gemm") and dq.output[0] in target.input


def test_activation_qparams_are_the_simulated_ones(mlp_export):
    result, model, _ = mlp_export
    inits = initializers(model)
    for name, layer in iter_quantized_layers(result.model):
        dq = producer(model, node_named(model, name).input[0])
        assert dq.op_type == "DequantizeLinear"
        scale, zero = inits[dq.input[1]], inits[dq.input[2]]
        assert zero.dtype == np.uint8
        assert float(scale) == float(layer.input_quantizer.scale)
        assert int(zero) == int(layer.input_quantizer.zero_point)


def test_no_transpose_between_weight_and_matmul(mlp_export):
    _, model, _ = mlp_export
    assert not any(node.op_type == "Transpose" for node in model.graph.node)


def test_reference_and_onnxruntime_compute_the_simulation(mlp_export):
    result, _, path = mlp_export
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(2))  # another batch size
    expected = simulated(result.model, x)
    reference = reference_run(path, x)
    ort = run_session(make_session(path), x)[0]
    assert reference.shape == ort.shape == expected.shape
    step = output_step(result.model)
    assert_matches(reference, expected, step)
    assert_matches(ort, expected, step)


def test_int8_file_is_at_most_0_3_of_fp32(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 10))
    data = torch.randn(64, 256)
    result = wb.ptq(model, [data], progress=False)
    int8_path = result.export_onnx(
        tmp_path / "int8.onnx", data[:2], fp32_path=tmp_path / "fp32.onnx", check_fusion=False
    )
    model_proto = onnx.load(str(int8_path))
    float_matrices = [
        init.name
        for init in model_proto.graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2
    ]
    assert float_matrices == []
    ratio = int8_path.stat().st_size / (tmp_path / "fp32.onnx").stat().st_size
    assert ratio <= 0.3


def test_conv_has_int32_bias_on_the_input_times_weight_grid(tmp_path, ort_exact_int8):
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    result = wb.ptq(small_cnn(), [data], config=ort_exact_int8, progress=False)
    path = result.export_onnx(tmp_path / "cnn.onnx", data[:2], check_fusion=False)
    model = onnx.load(str(path))
    inits = initializers(model)
    layer = dict(iter_quantized_layers(result.model))["conv"]
    bias_scale = layer.input_quantizer.scale * layer.weight_quantizer.scale
    codes = inits["conv.bias_quantized"]
    assert codes.dtype == np.int32
    np.testing.assert_allclose(inits["conv.bias_scale"], bias_scale.numpy(), rtol=1e-7)
    # the simulation's bias is already on that grid, so the codes reproduce it exactly
    on_grid = codes.astype(np.float32) * inits["conv.bias_scale"]
    np.testing.assert_array_equal(on_grid, layer.layer.bias.detach().numpy())
    conv = node_named(model, "conv")
    assert producer(model, conv.input[2]).op_type == "DequantizeLinear"
    assert [a.i for a in node_named(model, "conv/weight_dequantize").attribute] == [0]
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    step = output_step(result.model)
    assert_matches(run_session(make_session(path), x)[0], simulated(result.model, x), step)


def test_four_bit_weights_are_stored_as_int8_codes_in_the_4_bit_range(tmp_path):
    data = torch.randn(64, 12)
    result = wb.ptq(mlp(), [data], config="int4-weight", progress=False)
    path = result.export_onnx(tmp_path / "w4.onnx", data[:2], check_fusion=False)
    inits = initializers(onnx.load(str(path)))
    for name, layer in iter_quantized_layers(result.model):
        codes = inits[f"{name}.weight_quantized"]
        assert codes.dtype == np.int8 and codes.min() >= -8 and codes.max() <= 7
        dequantized = codes.T.astype(np.float32) * inits[f"{name}.weight_scale"][:, None]
        np.testing.assert_array_equal(dequantized, layer.quantized_weight().detach().numpy())
    reference = reference_run(path, data)
    assert_matches(reference, simulated(result.model, data), output_step(result.model))


def test_excluded_and_weight_only_layers(tmp_path):
    data = torch.randn(64, 12)
    config = wb.QuantConfig.preset("int8-weight-only", exclude=("4",))
    result = wb.ptq(mlp(), [data], config=config, progress=False)
    path = result.export_onnx(tmp_path / "wo.onnx", data[:2], check_fusion=False)
    model = onnx.load(str(path))
    assert not any(node.op_type == "QuantizeLinear" for node in model.graph.node)
    inits = initializers(model)
    assert "4.weight_quantized" not in inits  # the excluded layer keeps FP32 weights
    assert any(v.dtype == np.float32 and v.shape in ((4, 8), (8, 4)) for v in inits.values())
    # with its graph optimizations ONNX Runtime turns DQ -> MatMul into MatMulNBits, which
    # quantizes the activations on the fly (accuracy_level 4): exact only unoptimized
    output = run_session(make_session(path, optimize=False), data)[0]
    assert output_step(result.model) == 0.0  # no activation quantizer: float rounding only
    assert_matches(output, simulated(result.model, data), step=0.0)
    assert_matches(reference_run(path, data), simulated(result.model, data), step=0.0)


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 6)

    def forward(self, ids):
        return self.fc(self.embed(ids)).mean(dim=1)


def test_embedding_tables_export_as_int8_rows(tmp_path, ort_exact_int8):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (8, 7))
    config = wb.QuantConfig.preset("int8", weight=ort_exact_int8.weight, quantize_embeddings=True)
    result = wb.ptq(TokenModel().eval(), [ids], config=config, progress=False)
    assert result.report.layers.set_index("layer").loc["embed", "status"] == "quantized"
    path = result.export_onnx(tmp_path / "tokens.onnx", ids, check_fusion=False)
    table = initializers(onnx.load(str(path)))["embed.weight_quantized"]
    assert table.dtype == np.int8 and table.shape == (50, 16)
    other = torch.randint(0, 50, (3, 7))
    step = output_step(result.model)
    assert_matches(run_session(make_session(path), other)[0], simulated(result.model, other), step)


class Unexportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.cummax(self.fc(x), dim=1).values


def test_unexportable_op_gives_one_error_and_leaves_no_file(tmp_path):
    data = torch.randn(16, 8)
    result = wb.ptq(Unexportable(), [data], progress=False)
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="aten::cummax") as caught:
        result.export_onnx(target, data[:2])
    assert "Unexportable" in str(caught.value)  # names the module whose forward uses it
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind

    target.write_bytes(b"previous model")
    with pytest.raises(ExportError):
        result.export_onnx(target, data[:2])
    assert target.read_bytes() == b"previous model"  # an existing file is left untouched
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]


def test_example_input_must_be_tensors(tmp_path):
    result = wb.ptq(mlp(), [torch.randn(8, 12)], progress=False)
    with pytest.raises(ExportError, match="not a tensor"):
        result.export_onnx(tmp_path / "m.onnx", {"x": [1.0, 2.0]})
    assert list(tmp_path.iterdir()) == []


def test_layers_switched_off_after_calibration_export_as_fp32(tmp_path):
    from workbench.engine.quantizers.switches import quantize_only

    data = torch.randn(64, 12)
    result = wb.ptq(mlp(), [data], progress=False)
    quantize_only(result.model, ["2"])  # as sensitivity analysis leaves a model
    path = result.export_onnx(tmp_path / "one.onnx", data[:2], check_fusion=False)
    inits = initializers(onnx.load(str(path)))
    assert "2.weight_quantized" in inits
    assert "0.weight_quantized" not in inits and "4.weight_quantized" not in inits
    # a step at layer 2 reaches the output through Tanh (slope <= 1) and the FP32 layer 4
    gain = float(result.model.get_submodule("4").weight.abs().sum(dim=1).max())
    step = output_step(result.model, "2") * gain
    assert_matches(reference_run(path, data), simulated(result.model, data), step)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 4, 4, padding="same"),
        nn.Conv2d(3, 4, (3, 4), padding="same", dilation=(1, 2)),
        nn.Conv2d(3, 4, 3, stride=2, padding="valid", groups=1),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
    ],
)
def test_conv_padding_forms_and_groups(tmp_path, conv, ort_exact_int8):
    torch.manual_seed(0)
    shape = (
        (8, conv.in_channels, 16) if isinstance(conv, nn.Conv1d) else (8, conv.in_channels, 9, 9)
    )
    data = torch.randn(*shape)
    result = wb.ptq(nn.Sequential(conv, nn.Tanh()), [data], config=ort_exact_int8, progress=False)
    path = result.export_onnx(tmp_path / "conv.onnx", data[:2])
    fused = result.fusion(path, warn=False)
    assert fused.table["kernel"].tolist() == ["QLinearConv"]
    # integer and float accumulation may round a tie differently: at most one output step
    step = float(dict(iter_quantized_layers(result.model))["0"].output_quantizer.scale)
    difference = np.abs(run_session(make_session(path), data)[0] - simulated(result.model, data))
    assert difference.max() <= step + 1e-6
    assert (difference > 1e-5).mean() < 0.01


def test_amx_weight_encoding_keeps_values_and_results(tmp_path, ort_exact_int8):
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    result = wb.ptq(small_cnn(), [data], config=ort_exact_int8, progress=False)
    paths = {
        amx: result.export_onnx(tmp_path / f"amx_{amx}.onnx", data[:2], amx=amx, check_fusion=False)
        for amx in (False, True)
    }
    weights = {}
    for amx, path in paths.items():
        inits = initializers(onnx.load(str(path)))
        codes, zero = inits["conv.weight_quantized"], inits["conv.weight_zero_point"]
        assert codes.dtype == zero.dtype == np.int8
        assert set(zero.tolist()) == ({-1} if amx else {0})
        weights[amx] = (codes.astype(np.float32) - zero[:, None, None, None]) * inits[
            "conv.weight_scale"
        ][:, None, None, None]
    np.testing.assert_array_equal(weights[True], weights[False])
    outputs = {amx: run_session(make_session(path), data)[0] for amx, path in paths.items()}
    np.testing.assert_array_equal(outputs[True], outputs[False])  # the same integer sums
    assert result.fusion(paths[True]).all_fused


def test_fp32_export_of_a_user_model_keeps_its_modes(tmp_path):
    """Exporting runs the model in eval mode; afterwards each submodule has its own mode back
    (a model in training with a frozen part stays so) and the file computes the model."""
    from workbench.runtime.onnx_export import export_fp32_onnx

    model = nn.Sequential(nn.Linear(12, 16), nn.Dropout(0.5), nn.Linear(16, 4)).train()
    model[2].eval()
    before = [module.training for module in model.modules()]
    data = torch.randn(4, 12)
    path = export_fp32_onnx(model, tmp_path / "fp32.onnx", data)
    assert [module.training for module in model.modules()] == before
    model.eval()
    with torch.no_grad():
        expected = model(data).numpy()
    np.testing.assert_allclose(reference_run(path, data), expected, rtol=1e-5, atol=1e-6)


class SharedLayers(nn.Module):
    """One Linear and one Conv, each called at two sites (as weight-shared blocks are)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.conv(x))))
        x = x.mean(dim=(2, 3)).repeat(1, 4)
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class SharedConvChain(nn.Module):
    """One conv applied to its own output, no ReLU between, then ``y + z``: each call's input
    comes off a different grid (the image, the first call's output quantizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        z = self.conv(y)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(z + y, 1), 1))


def test_a_shared_conv_keeps_each_call_on_an_integer_kernel_through_qat(tmp_path, ort_exact_int8):
    torch.manual_seed(0)
    x = torch.randn(32, 4, 6, 6)
    y = torch.randint(0, 3, (32,))
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    model = SharedConvChain().eval()
    before = copy.deepcopy(model.state_dict())
    result = wb.qat(
        model,
        batches,
        config=ort_exact_int8,
        loss_fn=nn.functional.cross_entropy,
        epochs=1,
        lr=1e-3,
        progress=False,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    conv = result.model.conv
    first, second = conv.input_quantizer, conv.call_input_quantizers[0]
    assert float(first.scale) != float(second.scale)  # one input grid per call
    path = result.export_onnx(tmp_path / "chain.onnx", x[:2], check_fusion=False)
    graph = onnx.load(str(path)).graph
    codes = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # one weight, and each call's INT32 bias on the grid of its own input scale
    assert "conv#1.weight_quantized" not in codes
    for name, quantizer in (("conv", first), ("conv#1", second)):
        expected = torch.round(
            conv.layer.bias.detach()
            / (quantizer.scale * conv.weight_quantizer.qparams(conv.layer.weight)[0])
        )
        np.testing.assert_array_equal(
            codes[f"{name}.bias_quantized"], expected.numpy().astype(np.int32)
        )
    fusion = result.fusion(path, warn=False)
    assert list(fusion.table["kernel"]) == ["QLinearConv", "QLinearConv", "QGemm"]
    assert fusion.all_fused
    xs = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    step = output_step(result.model)
    assert_matches(run_session(make_session(path), xs)[0], simulated(result.model, xs), step)
    assert_matches(reference_run(path, xs), simulated(result.model, xs), step)


def test_a_layer_called_at_two_sites_exports_once_per_call(tmp_path, ort_exact_int8):
    torch.manual_seed(0)
    data = torch.randn(16, 4, 6, 6)
    result = wb.ptq(SharedLayers().eval(), [data], config=ort_exact_int8, progress=False)
    path = result.export_onnx(tmp_path / "shared.onnx", data[:2], check_fusion=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    names = [node.name for node in model.graph.node if node.name]
    assert len(names) == len(set(names))
    for layer in ("conv", "fc"):  # both calls are in the graph, each with its own node
        assert {layer, f"{layer}#1"} <= set(names)
    weights = [i.name for i in model.graph.initializer if i.name.endswith(".weight_quantized")]
    assert sorted(weights) == [
        "conv.weight_quantized",
        "fc.weight_quantized",
        "head.weight_quantized",
    ]
    readers = [n.name for n in model.graph.node if "conv.weight_quantized" in n.input]
    assert readers == ["conv/weight_dequantize", "conv#1/weight_dequantize"]
    fusion = result.fusion(path, warn=False)  # every call on an integer kernel
    rows = dict(zip(fusion.table["layer"], fusion.table["kernel"], strict=True))
    assert rows == {
        "conv": "QLinearConv",
        "conv#1": "QLinearConv",
        "fc": "QGemm",
        "fc#1": "QGemm",
        "head": "QGemm",
    }
    assert list(result.report.layers["layer"]).count("conv") == 1
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    step = output_step(result.model)
    assert_matches(reference_run(path, x), simulated(result.model, x), step)
    assert_matches(run_session(make_session(path), x)[0], simulated(result.model, x), step)
