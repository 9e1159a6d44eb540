"""The embedded digits demo: INT8 within 1 percentage point of FP32 for every observer."""

from __future__ import annotations

import pytest
import torch

import workbench as wb


@pytest.fixture(scope="module")
def digits_state(digits_model):
    return {k: v.detach().clone() for k, v in digits_model.state_dict().items()}


def test_trained_model_is_good_enough_to_measure(digits_model, digits_eval_fn):
    # the 1-point criterion means something only on a model that learned the task
    assert digits_eval_fn(digits_model) >= 95.0


def fp32_top1_percent(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model(images).argmax(dim=1) == labels).double().mean())


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse", "entropy"])
def test_int8_within_one_point_of_fp32(
    observer, digits_model, digits_data, digits_eval_fn, onnx_reference_top1
):
    config = wb.QuantConfig.preset("int8", observer=observer)
    res = wb.ptq(
        digits_model,
        digits_data.calib_batches(),
        config=config,
        eval_fn=digits_eval_fn,
        progress=False,
    )
    summary = res.report.summary
    images, labels = digits_data.test_x, digits_data.test_y
    fp32 = fp32_top1_percent(digits_model, images, labels)
    # the exported integers run by ONNX's reference implementation; a tie rounded the other
    # way may flip one image
    quantized = onnx_reference_top1(res, images, labels)
    one_image = 100.0 / len(labels)
    assert summary["metric_fp32"] == pytest.approx(fp32, abs=1e-4)
    assert summary["metric_quantized"] == pytest.approx(quantized, abs=one_image + 1e-4)
    assert fp32 - quantized <= 1.0
    assert summary["metric_drop"] == pytest.approx(fp32 - quantized)
    layers = res.report.layers.set_index("layer")
    assert list(layers.loc[["conv1", "conv2", "fc1", "fc2"], "status"]) == ["quantized"] * 4
    assert list(layers.loc[["bn1", "bn2"], "reason"]) == ["folded into conv1", "folded into conv2"]
    assert summary["compression_ratio"] > 3.5


def test_int4_weight_runs_and_reports_its_drop(
    digits_model, digits_data, digits_eval_fn, onnx_reference_top1
):
    res = wb.ptq(
        digits_model,
        digits_data.calib_batches(),
        config="int4-weight",
        eval_fn=digits_eval_fn,
        progress=False,
    )
    summary = res.report.summary
    labels = digits_data.test_y
    quantized = onnx_reference_top1(res, digits_data.test_x, labels)
    one_image = 100.0 / len(labels)
    assert summary["metric_quantized"] == pytest.approx(quantized, abs=one_image + 1e-4)
    assert summary["metric_drop"] == pytest.approx(
        summary["metric_fp32"] - summary["metric_quantized"]
    )
    assert quantized > 80.0  # degraded at most a little, not broken
    assert set(res.report.layers.dropna(subset=["bits"])["bits"]) == {4}
    int8 = wb.ptq(digits_model, digits_data.calib_batches(), config="int8", progress=False)
    assert summary["quantized_bytes"] < int8.report.summary["quantized_bytes"]
    assert summary["mean_output_sqnr_db"] < int8.report.summary["mean_output_sqnr_db"]


def test_session_model_never_modified(digits_model, digits_state, digits_data):
    wb.ptq(digits_model, digits_data.calib_batches(2), progress=False)
    after = digits_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in digits_state.items())
    assert not digits_model.training
