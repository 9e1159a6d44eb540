"""An op the ONNX exporter cannot convert is named, with the module that calls it, from the
exporter's own list of unconvertible ops (not from its message)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.errors import ExportError


class Histogram(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.histc(x, bins=4).sum()  # aten::histc: no ONNX equivalent


def test_the_unsupported_op_and_its_module_are_named(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(6, 4))
    model.add_module("hist", Histogram())
    result = wb.ptq(model, [torch.randn(8, 6)], progress=False)
    target = tmp_path / "hist.onnx"
    with pytest.raises(ExportError, match=r"op aten::histc used in module 'hist'"):
        result.export_onnx(target, torch.randn(1, 6), check_fusion=False)
    assert not target.exists()
