"""The digits demo CNN end to end: PTQ, INT8 ONNX export, ONNX Runtime on integer kernels,
and ONNX Runtime's predictions against the simulated model's and the true labels."""

from __future__ import annotations

import numpy as np
import pytest

import workbench as wb
from tests.parity_bounds import assert_parity_within_quantization_error
from workbench.demo import load_digits_data, train_digits_cnn
from workbench.runtime.ort_session import make_session, run_session


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory, ort_exact_int8):
    data = load_digits_data()
    model = train_digits_cnn(data, epochs=8)
    result = wb.ptq(model, data.calib_batches(), config=ort_exact_int8, progress=False)
    folder = tmp_path_factory.mktemp("digits")
    path = result.export_onnx(
        folder / "digits_int8.onnx", data.test_x[:8], fp32_path=folder / "digits_fp32.onnx"
    )
    return data, result, path


def test_every_quantized_layer_runs_on_an_integer_kernel(digits_export):
    _, result, path = digits_export
    fusion = result.fusion(path)
    assert fusion.unfused == []
    assert set(fusion.table["layer"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert set(fusion.table["kernel"]) <= {"QLinearConv", "QGemm", "MatMulIntegerToFloat"}


def test_onnxruntime_agrees_with_the_simulated_model(digits_export):
    data, result, path = digits_export
    parity = result.parity(path, [data.test_x], per_layer=True)
    row = parity.table.iloc[0]
    assert row["top1_agreement"] >= 0.995
    assert_parity_within_quantization_error(row)
    assert row["max_diff_steps"] <= 2.0
    assert (parity.layers["mismatch_fraction"] < 0.01).all()
    html = result.report._repr_html_()
    assert "ONNX Runtime parity" in html and "ONNX Runtime fusion" in html


def test_onnxruntime_accuracy_is_the_simulated_accuracy(digits_export):
    data, result, path = digits_export
    labels = data.test_y.numpy()
    ort_logits = run_session(make_session(path), data.test_x)[0]
    sim_logits = result.model(data.test_x).detach().numpy()
    fp32_logits = run_session(make_session(path.parent / "digits_fp32.onnx"), data.test_x)[0]
    ort_accuracy = float((ort_logits.argmax(1) == labels).mean())
    sim_accuracy = float((sim_logits.argmax(1) == labels).mean())
    fp32_accuracy = float((fp32_logits.argmax(1) == labels).mean())
    assert abs(ort_accuracy - sim_accuracy) <= 1 / len(labels) + 1e-9
    assert ort_accuracy >= fp32_accuracy - 0.02
    assert np.isfinite(ort_logits).all()
