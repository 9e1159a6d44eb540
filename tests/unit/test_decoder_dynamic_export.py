"""``export_onnx`` of a ``transformers`` decoder: batch and sequence axes are dynamic, so a
one-token example exports (the model was calibrated on longer windows) and the file runs any
length; ``wb.benchmark`` names what the file computes in."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from decoder_lm_models import tiny_llama, token_batches

import workbench as wb
from workbench.runtime.file_precision import file_precision


@pytest.fixture(scope="module")
def int4_result():
    config = wb.QuantConfig.preset("int4-weight-g32", quantize_embeddings=False)
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in token_batches()]
    return wb.ptq(tiny_llama(), calib, config=config, progress=False)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_one_token_example_exports_and_any_length_runs(int4_result, tmp_path):
    res = int4_result
    one_token = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, 1).long()}
    path = res.export_onnx(tmp_path / "lm.onnx", one_token, check_fusion=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 1), (3, 1), (2, 24)):
        ids = torch.randint(1, 200, (batch, length), generator=torch.Generator().manual_seed(3))
        mask = torch.ones_like(ids)
        (logits,) = session.run(
            ["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        )
        with torch.no_grad():
            expected = res.model(input_ids=ids, attention_mask=mask).logits.numpy()
        assert logits.shape == expected.shape
        # MatMulNBits at accuracy_level 4 quantizes its input to int8 per block: close, not equal
        # every position on its own: a causal mask traced for one token would break later ones
        for b in range(batch):
            for t in range(length):
                assert _cosine(logits[b, t], expected[b, t]) >= 0.999


def test_a_float_input_keeps_its_shape_check(int4_result, tmp_path):
    with pytest.raises(wb.CalibrationError, match="calibrated on"):
        int4_result.export_onnx(
            tmp_path / "x.onnx",
            {"input_ids": torch.ones(1, 4), "attention_mask": torch.ones(1, 4).long()},
            check_fusion=False,
        )


def test_benchmark_names_the_files_precision(int4_result, tmp_path):
    res = int4_result
    example = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, 1).long()}
    int4 = res.export_onnx(tmp_path / "int4.onnx", example, check_fusion=False)
    fp32 = res.export_fp32_onnx(tmp_path / "fp32.onnx", example)
    bench = wb.benchmark(fp32, int4, example, warmup=1, runs=3)
    precision = bench.table.set_index("model")["precision"]
    assert precision["fp32"] == "FP32" and precision["int8"] == "int4 weights"
    assert bench.summary_text().startswith("int4 weights ")
    assert "INT8" not in bench.speed_text()
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in token_batches()]
    int8 = wb.ptq(tiny_llama(), calib, config=wb.QuantConfig.preset("int8"), progress=False)
    int8_path = int8.export_onnx(tmp_path / "int8.onnx", example, check_fusion=False)
    assert file_precision(int8_path) == "INT8"
