"""INT8 attention matmuls (``QuantConfig(quantize_attention_matmuls=True)``): both inputs of
``Q K^T`` and ``attn V`` quantized at their call sites, ONNX Runtime runs them on integer
kernels and computes what the simulation computes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.errors import ConfigError
from workbench.runtime.ort_session import make_session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import text

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _config(base: wb.QuantConfig, on: bool) -> wb.QuantConfig:
    return wb.QuantConfig(
        weight=base.weight, activation=base.activation, quantize_attention_matmuls=on
    )


def _run(path, batch: dict) -> np.ndarray:
    session = make_session(path, 1)
    return session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]


def test_bert_attention_matmuls_run_on_integer_kernels_as_simulated(tmp_path, ort_exact_int8):
    model = text.bert(hidden=32, layers=2)
    data = text.tokens(4, batch=2, seq=12)
    result = wb.ptq(model, data, config=_config(ort_exact_int8, True), progress=False)
    sites = result.model.quantization_sites
    inputs = sorted(s for s in sites.site_names if "/input" in s)
    assert inputs == [
        f"encoder.layer.{layer}.attention.self.matmul#{call}/input{i}"
        for layer in (0, 1)
        for call in (0, 1)
        for i in (0, 1)
    ]
    probabilities = sites.quantizer("encoder.layer.0.attention.self.matmul#1/input0")
    # softmax output in [0, 1]: zero point 0 and a step of at most 1/255
    assert int(probabilities.zero_point) == 0
    assert float(probabilities.scale) <= 1 / 255 + 1e-7
    path = result.export_onnx(tmp_path / "bert.onnx", data[0], check_fusion=False)
    fusion = result.fusion(path, warn=False)
    matmuls = fusion.ops[fusion.ops["kind"] == "matmul"]
    assert len(matmuls) == 4  # Q K^T and attn V of each layer; Linear layers are not listed
    assert matmuls["quantized"].all() and matmuls["fused"].all()
    assert set(matmuls["kernel"]) <= {"MatMulIntegerToFloat", "QLinearMatMul"}
    assert fusion.all_fused or not fusion.unfused
    batch = text.tokens(1, batch=3, seq=12, seed=7)[0]
    with torch.no_grad():
        expected = result.model(**batch).last_hidden_state.numpy()
    got = _run(path, batch)
    a, b = got.ravel().astype(np.float64), expected.ravel().astype(np.float64)
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.9999
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


def test_attention_matmuls_stay_float_by_default(tmp_path, ort_exact_int8):
    model = text.bert(hidden=32, layers=1)
    data = text.tokens(2, batch=2, seq=8)
    result = wb.ptq(model, data, config=_config(ort_exact_int8, False), progress=False)
    sites = getattr(result.model, "quantization_sites", None)
    assert sites is None or not any("/input" in s for s in sites.site_names)
    path = result.export_onnx(tmp_path / "bert.onnx", data[0], check_fusion=False)
    matmuls = result.fusion(path, warn=False).ops.query("kind == 'matmul'")
    assert len(matmuls) == 2 and not matmuls["fused"].any()
    assert all("not quantized" in reason for reason in matmuls["reason"])


class WeightMatmul(nn.Module):
    """``x @ self.weight`` (a parameter) and ``x @ x^T`` (two activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        h = self.fc(x)
        return torch.matmul(h @ self.weight, h.transpose(-1, -2))


def test_only_activation_by_activation_matmuls_get_input_quantizers(ort_exact_int8):
    torch.manual_seed(0)
    result = wb.ptq(
        WeightMatmul().eval(),
        [torch.randn(4, 5, 8)],
        config=_config(ort_exact_int8, True),
        progress=False,
    )
    inputs = sorted(s for s in result.model.quantization_sites.site_names if "/input" in s)
    # one matmul site, its two inputs: ``h @ self.weight`` reads a parameter (a weight, whose
    # integer form would be a Linear's)
    assert len(inputs) == 2 and len({site.rsplit("/", 1)[0] for site in inputs}) == 1
    assert inputs[0].endswith("/input0") and inputs[1].endswith("/input1")


def test_the_option_is_checked():
    with pytest.raises(ConfigError, match="quantize_attention_matmuls must be True or False"):
        wb.QuantConfig(quantize_attention_matmuls="yes")
