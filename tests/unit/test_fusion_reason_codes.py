"""Fusion reasons carry codes (``reason_code`` beside the text), and the one place that reads
ONNX Runtime's node names (``source_node``) is checked on a graph ONNX Runtime optimized."""

from __future__ import annotations

import onnx
import pytest
import torch
from digits_models import tiny_cnn
from torch import nn

import workbench as wb
from workbench.runtime.fusion_check import (
    INTEGER_KERNELS,
    REASON_CODES,
    Reason,
    _unfused_reason,
    check_fusion,
    source_node,
)
from workbench.runtime.graph_info import read_graph_info
from workbench.runtime.ort_session import make_session

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_every_node_onnx_runtime_fused_names_the_layer_it_came_from(tmp_path):
    torch.manual_seed(0)
    result = wb.ptq(tiny_cnn(), [torch.randn(4, 1, 8, 8) for _ in range(2)], progress=False)
    path = result.export_onnx(tmp_path / "cnn.onnx", torch.randn(1, 1, 8, 8), check_fusion=False)
    make_session(path, 1, optimized_path=tmp_path / "optimized.onnx")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    layers = {layer.node for layer in read_graph_info(onnx.load(str(path))).layers}
    fused = [node.name for node in optimized.graph.node if node.op_type in INTEGER_KERNELS]
    assert any(name != source_node(name) for name in fused)  # ORT renamed what it made
    assert {source_node(name) for name in fused if source_node(name) in layers} == layers


def test_a_dynamic_linear_that_did_not_fuse_has_the_dynamic_codes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    result = wb.ptq(model, config=wb.QuantConfig.preset("int8-dynamic"))
    path = result.export_onnx(tmp_path / "mlp.onnx", torch.randn(2, 12), check_fusion=False)
    exported = onnx.load(str(path))
    layer = read_graph_info(exported).layers[0]
    assert _unfused_reason(exported.graph, layer).code == "dynamic_not_matched"
    rescale = next(n for n in exported.graph.node if n.name == f"{layer.node}/rescale")
    rescale.op_type = "Add"  # hand-edited: the Cast no longer feeds a Mul
    assert _unfused_reason(exported.graph, layer).code == "dynamic_pattern_broken"


def test_the_tables_carry_the_codes_of_their_reasons(tmp_path):
    torch.manual_seed(0)
    config = wb.QuantConfig.preset("int8-weight-only")  # FP32 inputs: nothing fuses
    result = wb.ptq(tiny_cnn(), [torch.randn(4, 1, 8, 8)], config=config, progress=False)
    path = result.export_onnx(tmp_path / "w8.onnx", torch.randn(1, 1, 8, 8), check_fusion=False)
    table = check_fusion(path, warn=False).table
    unfused = table[~table["fused"].astype(bool)]
    assert len(unfused) > 0
    assert set(unfused["reason_code"]) == {"input_not_quantized"}
    assert (table.loc[table["fused"].astype(bool), "reason_code"] == "").all()
    assert set(table["reason_code"]) <= {*REASON_CODES, ""}


def test_a_reason_is_its_text_and_survives_pickling():
    import pickle

    reason = Reason("activation_not_8bit", "activation is not 8-bit")
    assert reason == "activation is not 8-bit" and reason.code == "activation_not_8bit"
    copy = pickle.loads(pickle.dumps(reason))
    assert (copy, copy.code) == (reason, reason.code)
    with pytest.raises(ValueError, match="unknown fusion reason code"):
        Reason("slow", "it is slow")
