"""Block-wise Linear weights exported as packed MatMulNBits: the packed bytes against the core's
codes, ONNX Runtime against the simulation, the file size against the storage table."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import workbench as wb
from tests.parity_bounds import assert_within_quantization_error
from workbench.errors import ExportError
from workbench.runtime.ort_session import make_session, run_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def stack(inputs: int = 200) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(inputs, 96), nn.GELU(), nn.Linear(96, 40), nn.GELU(), nn.Linear(40, 7, bias=False)
    ).eval()


def unpack(packed: np.ndarray, bits: int, columns: int) -> np.ndarray:
    """MatMulNBits' ``B [N, blocks, blob]`` back to unsigned codes ``[N, K]``, written out bit by
    bit (the layout ONNX Runtime documents: the first code in the lowest bits)."""
    rows = packed.shape[0]
    flat = packed.reshape(rows, -1)
    codes = []
    for byte in range(flat.shape[1]):
        for slot in range(8 // bits):
            codes.append((flat[:, byte] >> (slot * bits)) & (2**bits - 1))
    return np.stack(codes, axis=1)[:, :columns]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize(
    ("bits", "symmetric", "group"), [(4, True, 32), (4, False, 16), (2, True, 64), (8, False, 32)]
)
def test_packed_weights_are_the_simulated_codes_and_ort_computes_the_simulation(
    tmp_path, bits, symmetric, group
):
    model = stack()
    x = torch.randn(16, 200)
    scheme = wb.Scheme(bits, symmetric, True, 0, group_size=group)
    result = wb.ptq(model, [x], config=wb.QuantConfig(weight=scheme, activation=None))
    path = result.export_onnx(tmp_path / "m.onnx", x[:2], accuracy_level=1)
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.name == "0")
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
    expected = wb.quantize_tensor(model[0].weight.detach(), scheme)  # minmax, as the config
    offset = 2 ** (bits - 1) if symmetric else 0
    codes = unpack(inits["0.weight_quantized"], bits, 200).astype(np.int32) - offset
    np.testing.assert_array_equal(codes, expected.q.numpy().astype(np.int32))
    np.testing.assert_array_equal(inits["0.weight_scale"], expected.scale.numpy().reshape(-1))
    if not symmetric:
        zero = unpack(inits["0.weight_zero_point"], bits, expected.scale.shape[1])
        np.testing.assert_array_equal(zero, expected.zero_point.numpy())
    with torch.no_grad():
        simulated = result.model(x).numpy()
    (fp32_compute,) = run_session(make_session(path), x)  # accuracy_level 1: FP32 compute
    np.testing.assert_allclose(fp32_compute, simulated, rtol=1e-4, atol=1e-5)
    fast = result.export_onnx(tmp_path / "fast.onnx", x[:2])  # default 4: int8 compute
    (int8_compute,) = run_session(make_session(fast), x)
    # accuracy level 4 rounds each input block to int8, which the simulation does not model
    # (its error can exceed the 8-bit weights' own): close, not within the weights' error
    assert cosine(int8_compute, simulated) >= 0.999
    table = result.fusion(fast, warn=False).table
    assert list(table["kernel"]) == ["MatMulNBits"] * 3


@pytest.mark.parametrize(("group", "symmetric"), [(32, True), (128, False)])
def test_file_size_equals_the_storage_table_within_2_percent(tmp_path, group, symmetric):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 768), nn.ReLU(), nn.Linear(768, 384)).eval()
    x = torch.randn(4, 512)
    scheme = wb.Scheme(4, symmetric, True, 0, group_size=group)
    result = wb.ptq(model, [x], config=wb.QuantConfig(weight=scheme, activation=None))
    path = result.export_onnx(tmp_path / "m.onnx", x[:1], check_fusion=False)
    total = int(result.report.storage.set_index("layer").loc["TOTAL", "total_bytes"])
    fp32 = int(result.report.storage.set_index("layer").loc["TOTAL", "fp32_bytes"])
    assert abs(os.path.getsize(path) / total - 1) <= 0.02
    assert os.path.getsize(path) < 0.2 * fp32


def test_bad_accuracy_level_raises_and_writes_nothing(tmp_path):
    model = stack()
    x = torch.randn(4, 200)
    result = wb.ptq(model, [x], config=wb.QuantConfig.preset("int4-weight-g32"))
    with pytest.raises(ExportError, match="accuracy_level must be one of"):
        result.export_onnx(tmp_path / "m.onnx", x, accuracy_level=7)
    assert not list(tmp_path.iterdir())


def test_three_bit_codes_run_in_four_bit_blocks(tmp_path):
    model = stack()
    x = torch.randn(8, 200)
    config = wb.QuantConfig(weight=wb.Scheme(3, True, True, 0, group_size=32), activation=None)
    result = wb.ptq(model, [x], config=config)
    path = result.export_onnx(tmp_path / "m.onnx", x[:1], accuracy_level=1, check_fusion=False)
    bits = {
        n.name: a.i
        for n in onnx.load(str(path)).graph.node
        for a in n.attribute
        if a.name == "bits"
    }
    assert bits == {"0": 4, "2": 4, "4": 4}
    with torch.no_grad():
        simulated = result.model(x).numpy()
    np.testing.assert_allclose(
        run_session(make_session(path), x)[0], simulated, rtol=1e-4, atol=1e-5
    )


def test_gptq_codes_with_a_partial_last_group_export_as_simulated(tmp_path):
    model = stack()  # 200 inputs: six groups of 32 and one of 8
    x = torch.randn(64, 200)
    config = wb.QuantConfig.preset("int4-weight-g32", weight_method="gptq")
    result = wb.ptq(model, [x], config=config)
    quantizer = result.model[0].weight_quantizer
    scheme = quantizer.scheme
    rebuilt = wb.core.dequantize_with(
        quantizer.codes, quantizer.scale, quantizer.zero_point, scheme
    )
    assert torch.equal(rebuilt, result.model[0].quantized_weight())
    path = result.export_onnx(tmp_path / "m.onnx", x[:1], accuracy_level=1, check_fusion=False)
    with torch.no_grad():
        simulated = result.model(x).numpy()
    np.testing.assert_allclose(
        run_session(make_session(path), x)[0], simulated, rtol=1e-4, atol=1e-5
    )


def test_quantized_inputs_keep_an_fp32_bias_before_matmul_nbits(tmp_path):
    model = stack()
    x = torch.randn(32, 200)
    config = wb.QuantConfig(
        weight=wb.Scheme(4, True, True, 0, group_size=32), activation=wb.Scheme(8, False, False)
    )
    result = wb.ptq(model, [x], config=config)
    assert torch.equal(result.model[0].layer.bias, model[0].bias)  # not rounded to INT32
    path = result.export_onnx(tmp_path / "m.onnx", x[:1], accuracy_level=1)
    assert list(result.fusion(path, warn=False).table["kernel"]) == ["MatMulNBits"] * 3
    with torch.no_grad():
        simulated, fp32 = result.model(x).numpy(), model(x).numpy()
    assert_within_quantization_error(run_session(make_session(path), x)[0], simulated, fp32)


class TokenModel(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(300, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, ids):
        return self.head(self.table(ids))


@pytest.mark.parametrize(
    ("bits", "symmetric", "dim", "kernel"),
    [(4, True, 64, 4), (4, False, 96, 4), (3, False, 64, 4), (6, True, 64, 8), (4, True, 40, 0)],
)
def test_block_wise_embedding_tables_gather_packed_rows(tmp_path, bits, symmetric, dim, kernel):
    torch.manual_seed(0)
    model = TokenModel(dim).eval()
    ids = torch.randint(0, 300, (4, 9))
    scheme = wb.Scheme(bits, symmetric, True, 0, group_size=32)
    config = wb.QuantConfig(weight=scheme, activation=None, quantize_embeddings=True)
    result = wb.ptq(model, [ids], config=config)
    path = result.export_onnx(tmp_path / "m.onnx", ids, accuracy_level=1, check_fusion=False)
    proto = onnx.load(str(path))
    gathers = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    if kernel == 0:  # 40 is no multiple of 32: one scale per row, int8 rows
        assert not gathers
        assert result.model.table.weight_quantizer.scale.shape == (300,)
    else:
        (gather,) = gathers
        assert {a.name: a.i for a in gather.attribute}["bits"] == kernel
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        assert inits["table.weight_quantized"].shape == (300, dim * kernel // 8)
        expected = wb.quantize_tensor(model.table.weight.detach(), scheme)
        np.testing.assert_array_equal(inits["table.weight_scale"], expected.scale.numpy())
    with torch.no_grad():
        simulated = result.model(ids).numpy()
    np.testing.assert_allclose(
        run_session(make_session(path), ids)[0], simulated, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("preset", ["int8", "int4-weight", "w4a4", "int4-weight-g32"])
def test_onnx_bytes_column_is_what_the_file_stores(tmp_path, preset):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 64, 3),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 384),
    ).eval()
    x = torch.randn(2, 16, 8, 8)
    overrides = {}
    if preset == "int4-weight-g32":  # convs take per-channel 4-bit weights
        overrides = {
            "0": {"weight": wb.Scheme(4, True, True)},
            "2": {"weight": wb.Scheme(4, True, True)},
        }
    result = wb.ptq(model, [x], config=wb.QuantConfig.preset(preset, overrides=overrides))
    path = result.export_onnx(tmp_path / "m.onnx", x, check_fusion=False)
    storage = result.report.storage.set_index("layer")
    onnx_total = int(storage.loc["TOTAL", "onnx_bytes"])
    assert abs(os.path.getsize(path) / onnx_total - 1) <= 0.02
    linear = storage.loc["5"]
    if preset == "int4-weight-g32":  # packed: the file holds what the table counts
        assert linear["onnx_bytes"] == linear["total_bytes"]
    if preset in ("int4-weight", "w4a4"):  # int8 codes of 4-bit values: one byte each
        assert linear["onnx_bytes"] - linear["total_bytes"] >= 64 * 16 * 384 // 2
