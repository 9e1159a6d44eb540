"""The fusion check's reason for a dynamic Linear that did not fuse names the dynamic pattern
(DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul), not "input is not quantized"."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.runtime.fusion_check import _unfused_reason
from workbench.runtime.graph_info import read_graph_info

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    result = wb.ptq(model, config=wb.QuantConfig.preset("int8-dynamic"))
    path = tmp_path_factory.mktemp("fusion_dynamic") / "mlp.onnx"
    result.export_onnx(path, torch.randn(2, 12), check_fusion=False)
    return onnx.load(str(path))


def test_an_unfused_dynamic_linear_is_reported_as_the_dynamic_pattern(exported):
    layers = read_graph_info(exported).layers
    assert len(layers) == 2
    for layer in layers:
        reason = _unfused_reason(exported.graph, layer)
        assert "DynamicQuantizeLinear -> MatMulInteger" in reason
        assert "not quantized" not in reason


def test_a_dynamic_linear_without_its_rescaling_mul_says_the_pattern_is_broken(exported):
    model = onnx.ModelProto()
    model.CopyFrom(exported)
    layer = read_graph_info(model).layers[0]
    rescale = next(n for n in model.graph.node if n.name == f"{layer.node}/rescale")
    rescale.op_type = "Add"  # hand-edited: the Cast no longer feeds a Mul
    reason = _unfused_reason(model.graph, layer)
    assert reason.startswith("dynamic pattern broken")
    assert "Cast -> Mul" in reason
