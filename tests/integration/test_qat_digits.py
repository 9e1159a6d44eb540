"""QAT of the digits demo CNN: int8 ends next to FP32, 2-bit weights recover what PTQ loses,
and the exported INT8 ONNX model computes what QAT trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb

CE = nn.CrossEntropyLoss()


def test_int8_qat_ends_within_0_3_points_of_fp32(
    digits_model, digits_data, digits_eval_fn, onnx_reference_top1
):
    state = {k: v.clone() for k, v in digits_model.state_dict().items()}
    result = wb.qat(
        digits_model,
        digits_data.train_loader(),
        config="int8",
        loss_fn=CE,
        epochs=2,
        lr=1e-4,
        eval_fn=digits_eval_fn,
        progress=False,
    )
    images, labels = digits_data.test_x, digits_data.test_y
    with torch.no_grad():
        fp32 = 100.0 * float((digits_model(images).argmax(dim=1) == labels).double().mean())
    # what QAT trained, exported and run by ONNX's reference implementation (a tie rounded
    # the other way may flip one image)
    qat = onnx_reference_top1(result, images, labels)
    one_image = 100.0 / len(labels)
    assert qat >= fp32 - 0.3 - one_image, f"FP32 {fp32:.2f}% vs int8 QAT {qat:.2f}%"
    summary = result.report.summary
    assert summary["metric_fp32"] == pytest.approx(fp32, abs=1e-4)
    assert summary["metric_quantized"] == pytest.approx(qat, abs=one_image + 1e-4)
    assert summary["metric_quantized"] >= fp32 - 0.3
    assert list(result.report.epochs["epoch"]) == [1, 2]
    assert result.history["metric"].dropna().iloc[-1] == pytest.approx(summary["metric_quantized"])
    for key, value in digits_model.state_dict().items():
        assert torch.equal(value, state[key])


def test_two_bit_weights_qat_recovers_most_of_what_ptq_loses(
    digits_model, digits_data, digits_eval_fn
):
    config = wb.QuantConfig(weight=wb.Scheme(2, True, True, 0))
    ptq = wb.ptq(digits_model, digits_data.calib_batches(), config=config, progress=False)
    qat = wb.qat(
        digits_model,
        digits_data.train_loader(),
        config=config,
        loss_fn=CE,
        epochs=3,
        lr=1e-3,
        progress=False,
    )
    fp32 = digits_eval_fn(digits_model)
    ptq_acc, qat_acc = digits_eval_fn(ptq.model), digits_eval_fn(qat.model)
    assert fp32 - ptq_acc > 5.0  # a case where PTQ loses a lot
    recovered = (qat_acc - ptq_acc) / (fp32 - ptq_acc)
    assert recovered >= 0.5, f"FP32 {fp32:.2f} PTQ {ptq_acc:.2f} QAT {qat_acc:.2f}"


def test_exported_onnx_computes_what_qat_trained(tmp_path, digits_model, digits_data):
    import onnxruntime as ort

    result = wb.qat(
        digits_model,
        digits_data.train_loader(),
        loss_fn=CE,
        lr=1e-4,
        learn_scales=True,
        progress=False,
    )
    path = result.export_onnx(tmp_path / "qat.onnx", digits_data.test_x[:1], check_fusion=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    onnx_logits = session.run(None, {name: digits_data.test_x.numpy()})[0]
    with torch.no_grad():
        torch_logits = result.model(digits_data.test_x).numpy()
    agreement = float(np.mean(onnx_logits.argmax(1) == torch_logits.argmax(1)))
    assert agreement >= 0.99
