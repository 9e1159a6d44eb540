"""A small BERT from a transformers config at 4-bit block-wise weights: every Linear runs as
ONNX Runtime's MatMulNBits and the exported model computes the simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.runtime.ort_session import make_session, run_session

from . import text

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize(("preset", "hidden"), [("int4-weight-g32", 64), ("int4-weight-g128", 128)])
def test_bert_linear_layers_run_as_matmul_nbits_and_match_the_simulation(tmp_path, preset, hidden):
    model = text.bert(hidden=hidden, layers=2)
    batches = text.tokens(2)
    config = wb.QuantConfig.preset(preset, quantize_embeddings=True)
    result = wb.ptq(model, batches, config=config)
    path = result.export_onnx(tmp_path / "bert.onnx", batches[0])
    table = result.fusion(path, warn=False).table
    linear = table[table["op_type"] == "MatMulNBits"]
    assert len(linear) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert (linear["kernel"] == "MatMulNBits").all()
    with torch.no_grad():
        simulated = result.model(**batches[1]).last_hidden_state.numpy()
    (ort,) = run_session(make_session(path), batches[1])[:1]
    a, b = ort.reshape(-1).astype(np.float64), simulated.reshape(-1).astype(np.float64)
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.999
