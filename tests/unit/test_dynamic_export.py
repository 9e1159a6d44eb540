"""Export of dynamic quantization: each Linear becomes the pattern ONNX Runtime's
quantize_dynamic writes (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add), holding
the simulated model's codes and scales; onnx.reference and ONNX Runtime compute what the
simulation computes, and ONNX Runtime fuses every Linear into an integer kernel."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import workbench as wb
from tests.conftest import ort_exact_weight_bits
from tests.parity_bounds import (
    assert_parity_within_quantization_error,
    assert_within_quantization_error,
)
from tests.zoo.text import bert, tokens
from workbench.core.dynamic_quant import dynamic_qparams
from workbench.engine.placement.layers import iter_quantized_layers
from workbench.runtime.ort_session import make_session, run_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
DYNAMIC_KERNELS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def exact_dynamic_config(**changes) -> wb.QuantConfig:
    """``int8-dynamic`` with the weight width at which ORT computes the simulation exactly on
    this CPU (7 bits without VNNI: its U8S8 kernels saturate int16 pair sums)."""
    weight = wb.Scheme(bits=ort_exact_weight_bits(), symmetric=True, per_channel=True)
    return wb.QuantConfig.preset("int8-dynamic", weight=weight, **changes)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.fixture(scope="module")
def mlp_export(tmp_path_factory):
    model = mlp()
    result = wb.ptq(model, config=exact_dynamic_config())  # no calibration data needed
    path = tmp_path_factory.mktemp("dynamic") / "mlp_dynamic.onnx"
    result.export_onnx(path, torch.randn(4, 12), check_fusion=False)
    return model, result, onnx.load(str(path)), path


def test_each_linear_is_the_dynamic_pattern_with_the_simulated_codes(mlp_export):
    model, result, graph_model, _ = mlp_export
    nodes = {node.name: node for node in graph_model.graph.node}
    producer = {out: node for node in graph_model.graph.node for out in node.output}
    inits = initializers(graph_model)
    assert not any(n.op_type in ("QuantizeLinear", "MatMul") for n in graph_model.graph.node)
    for name, layer in iter_quantized_layers(result.model):
        integer = nodes[name]
        assert integer.op_type == "MatMulInteger"
        assert producer[integer.input[0]].op_type == "DynamicQuantizeLinear"
        scale = layer.weight_quantizer.scale.detach()
        expected = torch.round(layer.quantized_weight().detach() / scale[:, None]).to(torch.int8)
        codes = inits[f"{name}.weight_quantized"]
        assert codes.dtype == np.int8
        np.testing.assert_array_equal(codes, expected.numpy().T)  # W^T [in, out]
        np.testing.assert_array_equal(inits[f"{name}.weight_scale"], scale.numpy())
        assert not inits[f"{name}.weight_zero_point"].any()
        # the bias stays FP32, unrounded: the input scale changes with every call
        np.testing.assert_array_equal(inits[f"{name}.bias"], model[int(name)].bias.detach())


def last_layer_step(model: nn.Module, x: torch.Tensor) -> float:
    """How far the output moves when one code of the last Linear's input moves by one step:
    that input's own (dynamic) scale times the largest |weight|."""
    _, last = list(iter_quantized_layers(model))[-1]
    seen = []
    handle = last.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    scale, _ = dynamic_qparams(seen[0])
    return float(scale * last.quantized_weight().abs().max())


def assert_matches(actual: np.ndarray, expected: np.ndarray, step: float) -> None:
    """Equal up to float rounding, except where the float and the integer arithmetic round a
    tie at a later quantizer differently: a few rows then move by about one step, never two."""
    float_rounding = 1e-5 * max(1.0, float(np.abs(expected).max()))
    difference = np.abs(actual - expected)
    assert (difference <= float_rounding).mean() >= 0.9
    assert difference.max() <= 2.0 * step + float_rounding, (difference.max(), step)


def test_onnx_reference_and_onnxruntime_compute_the_simulation(mlp_export):
    _, result, _, path = mlp_export
    for magnitude in (0.05, 1.0, 40.0):  # each input its own scale
        x = torch.randn(30, 12, generator=torch.Generator().manual_seed(3)) * magnitude
        with torch.no_grad():
            expected = result.model(x).numpy()
        step = last_layer_step(result.model, x)
        reference = ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0]
        assert_matches(reference, expected, step)
        assert_matches(run_session(make_session(path), x)[0], expected, step)


def test_onnxruntime_fuses_every_linear(mlp_export):
    _, result, _, path = mlp_export
    fusion = result.fusion(path)
    assert fusion.all_fused
    assert set(fusion.table["kernel"]) <= DYNAMIC_KERNELS
    assert len(fusion.table) == 3
    assert fusion.ops is None or fusion.ops.empty or not fusion.ops["quantized"].any()


def test_bert_fuses_and_matches_the_simulation(tmp_path):
    model = bert()
    data = tokens(2, batch=4, seq=16)
    result = wb.ptq(model, data, config=exact_dynamic_config(), progress=False)
    path = result.export_onnx(tmp_path / "bert_dynamic.onnx", data[0])
    fusion = result.fusion(path)
    assert fusion.all_fused and len(fusion.table) == 12
    assert set(fusion.table["kernel"]) <= DYNAMIC_KERNELS
    kernels = dict(zip(fusion.kernels["op_type"], fusion.kernels["count"], strict=True))
    assert "MatMul (FP32)" not in kernels or kernels["MatMul (FP32)"] <= 4  # attention only
    parity = result.parity(path, data)
    row = parity.table.iloc[0]
    assert_parity_within_quantization_error(row)
    assert abs(row["cosine_gap"]) <= 0.001


def test_convs_export_weight_only_beside_dynamic_linears(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)
    ).eval()
    data = torch.randn(8, 3, 8, 8)
    result = wb.ptq(model, [data], config=exact_dynamic_config(), progress=False)
    path = result.export_onnx(tmp_path / "cnn_dynamic.onnx", data[:2], check_fusion=False)
    graph = onnx.load(str(path)).graph
    types = [node.op_type for node in graph.node]
    assert types.count("DynamicQuantizeLinear") == 1 and types.count("MatMulInteger") == 1
    assert "QuantizeLinear" not in types and "Conv" in types  # FP32 input, int8 weight
    conv = next(node for node in graph.node if node.op_type == "Conv")
    producer = {out: node for node in graph.node for out in node.output}
    assert producer[conv.input[1]].op_type == "DequantizeLinear"
    ort = run_session(make_session(path), data)[0]
    with torch.no_grad():
        expected = result.model(data).numpy()
        fp32 = model(data).numpy()
    assert_within_quantization_error(ort, expected, fp32)


def test_a_switched_off_input_exports_as_weight_only(tmp_path):
    model = mlp()
    result = wb.ptq(model, config=exact_dynamic_config())
    first = dict(iter_quantized_layers(result.model))["0"]
    first.input_quantizer.mode = "off"
    x = torch.randn(6, 12)
    path = result.export_onnx(tmp_path / "off.onnx", x, check_fusion=False)
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("MatMulInteger") == 2
    with torch.no_grad():
        expected = result.model(x).numpy()
    step = last_layer_step(result.model, x)
    # unoptimized: ONNX Runtime fuses the weight-only layer into MatMulNBits, whose accuracy
    # level 4 quantizes its input (as for any weight-only Linear)
    assert_matches(run_session(make_session(path, 1, optimize=False), x)[0], expected, step)
