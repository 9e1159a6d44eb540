"""Storage accounting against the tutorial's Linear(10, 5) table and whole-model sums."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import workbench as wb

# The tutorial's table for nn.Linear(10, 5): 50 weights, 5 biases.
#             weight  scales  zero points  bias  total
SEED_TABLE = {
    "symmetric per-tensor": (wb.Scheme(8, True, False), 50, 4, 0, 20, 74),
    "asymmetric per-tensor": (wb.Scheme(8, False, False), 50, 4, 1, 20, 75),
    "symmetric per-channel": (wb.Scheme(8, True, True), 50, 20, 0, 20, 90),
    "asymmetric per-channel": (wb.Scheme(8, False, True), 50, 20, 5, 20, 95),
}
COLUMNS = ["weight_bytes", "scale_bytes", "zero_point_bytes", "bias_bytes", "total_bytes"]


@pytest.mark.parametrize("case", list(SEED_TABLE))
def test_linear_10_5_matches_the_seed_table(case):
    scheme, *expected = SEED_TABLE[case]
    torch.manual_seed(0)
    model = nn.Linear(10, 5)
    res = wb.ptq(model, torch.randn(8, 10), config=wb.QuantConfig(weight=scheme), progress=False)
    storage = res.report.storage
    assert list(storage.columns) == [
        "layer",
        "type",
        "status",
        "fp32_bytes",
        *COLUMNS,
        "onnx_bytes",
    ]
    layer, total = storage.iloc[0], storage.iloc[-1]
    assert total["layer"] == "TOTAL" and len(storage) == 2
    assert layer["fp32_bytes"] == 220 == (50 + 5) * 4
    assert [int(layer[c]) for c in COLUMNS] == expected
    assert [int(total[c]) for c in COLUMNS] == expected
    assert all(str(storage[c].dtype) == "int64" for c in ["fp32_bytes", *COLUMNS])


@pytest.mark.parametrize("bits,weight_bytes", [(8, 50), (4, 25), (2, 13), (3, 19)])
def test_packed_weights_below_8_bits(bits, weight_bytes):
    model = nn.Linear(10, 5)
    config = wb.QuantConfig(weight=wb.Scheme(bits, True, True))
    res = wb.ptq(model, torch.randn(8, 10), config=config, progress=False)
    row = res.report.storage.iloc[0]
    assert row["weight_bytes"] == weight_bytes  # ceil(50 * bits / 8)
    assert row["total_bytes"] == weight_bytes + 20 + 20


def test_linear_without_bias():
    res = wb.ptq(nn.Linear(10, 5, bias=False), torch.randn(8, 10), progress=False)
    row = res.report.storage.iloc[0]
    assert (row["fp32_bytes"], row["bias_bytes"], row["total_bytes"]) == (200, 0, 70)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 10)
        self.conv = nn.Conv1d(10, 6, 3)
        self.bn = nn.BatchNorm1d(6)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 5)
        self.skip = nn.Linear(6, 5)

    def forward(self, ids):
        x = self.bn(self.conv(self.embed(ids).transpose(1, 2))).transpose(1, 2)
        x = self.norm(x)
        return self.fc(x) + self.skip(x)


def test_whole_model_total_is_the_sum_of_the_layers():
    torch.manual_seed(0)
    model = Mixed().eval()
    config = wb.QuantConfig.preset("int8", exclude=("skip",))
    res = wb.ptq(model, [torch.randint(0, 20, (4, 9))], config=config, progress=False)
    storage = res.report.storage.set_index("layer")
    rows, total = storage.drop(index="TOTAL"), storage.loc["TOTAL"]
    for column in ["fp32_bytes", *COLUMNS]:
        assert total[column] == rows[column].sum()
    assert (rows[COLUMNS[:-1]].sum(axis=1) == rows["total_bytes"]).all()
    # FP32 bytes cover every parameter of the original model
    assert total["fp32_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    # the folded BN stores nothing; excluded and unsupported layers store FP32
    assert storage.loc["bn", "total_bytes"] == 0 and storage.loc["bn", "fp32_bytes"] == 48
    assert storage.loc["skip", "total_bytes"] == storage.loc["skip", "fp32_bytes"] == 4 * 35
    assert storage.loc["embed", "total_bytes"] == 4 * 200
    assert storage.loc["norm", "total_bytes"] == 4 * 12
    # conv: 6*10*3 int8 weights, 6 per-channel scales, 6 FP32 biases (BN folded in)
    assert storage.loc["conv", "total_bytes"] == 180 + 24 + 24
    summary = res.report.summary
    assert summary["fp32_bytes"] == total["fp32_bytes"]
    assert summary["quantized_bytes"] == total["total_bytes"]
    assert summary["compression_ratio"] == pytest.approx(total["fp32_bytes"] / total["total_bytes"])


def test_bias_bytes_are_the_int32_codes_the_export_stores(tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    data = torch.randn(8, 10)
    res = wb.ptq(nn.Sequential(nn.Linear(10, 5)), data, progress=False)
    path = res.export_onnx(tmp_path / "linear.onnx", data[:2], check_fusion=False)
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    gemm = next(node for node in graph.node if node.op_type == "Gemm")
    bias_dq = next(node for node in graph.node if gemm.input[2] in node.output)
    assert bias_dq.op_type == "DequantizeLinear"
    codes = inits[bias_dq.input[0]]
    assert codes.dtype == np.int32 and codes.shape == (5,)
    assert res.report.storage.set_index("layer").loc["0", "bias_bytes"] == codes.nbytes
