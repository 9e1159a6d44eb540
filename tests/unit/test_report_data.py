"""``report_data=``: the report's per-layer errors measured on held-out batches instead of the
calibration batches (wb.ptq, wb.auto_mixed_precision, wb.keep_most_sensitive_fp32, wb.qat).

Reference: each layer's output in the FP32 and the quantized model caught with forward hooks
on the held-out batches, SQNR and cosine computed here in NumPy over all of them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from digits_models import tiny_cnn, tiny_mlp
from model_guard import Snapshot
from torch import nn

import workbench as wb
from workbench.demo import accuracy


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


@pytest.fixture(scope="module")
def calib(digits):
    return digits.calib_batches(2, 32)  # training images


@pytest.fixture(scope="module")
def held_out(digits):
    return [digits.test_x[:64], digits.test_x[64:128]]


def outputs_by_layer(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict:
    """Each named layer's outputs over ``batches``, flattened and joined, as float64."""
    caught: dict[str, list[np.ndarray]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: caught[name].append(out.detach().double().numpy())
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            final = [model(x).double().numpy() for x in batches]
    finally:
        for handle in handles:
            handle.remove()
    joined = {name: np.concatenate([o.ravel() for o in outs]) for name, outs in caught.items()}
    joined["<model>"] = np.concatenate([o.ravel() for o in final])
    return joined


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - approx) ** 2)))


def cosine(ref: np.ndarray, approx: np.ndarray) -> float:
    return float(ref @ approx / np.sqrt((ref @ ref) * (approx @ approx)))


def assert_errors_measured_on(result: wb.QuantResult, batches: list[torch.Tensor]) -> None:
    layers = result.report.layers.set_index("layer")
    names = list(layers.index[layers["status"] == "quantized"])
    ref = outputs_by_layer(result.fp32_model, names, batches)
    out = outputs_by_layer(result.model, names, batches)
    for name in names:
        assert layers.loc[name, "output_sqnr_db"] == pytest.approx(sqnr_db(ref[name], out[name]))
        assert layers.loc[name, "output_cosine"] == pytest.approx(cosine(ref[name], out[name]))
    summary = result.report.summary
    assert summary["model_output_sqnr_db"] == pytest.approx(sqnr_db(ref["<model>"], out["<model>"]))
    assert summary["layer_errors_on"] == "report_data"
    assert summary["layer_errors_batches"] == len(batches)


def test_ptq_measures_the_report_on_report_data_and_calibrates_as_without(
    model, calib, held_out, digits
):
    snapshot = Snapshot(model, calib, held_out)
    with_held_out = wb.ptq(model, calib, "w4a4", report_data=held_out, progress=False)
    snapshot.assert_unchanged()
    assert_errors_measured_on(with_held_out, held_out)
    plain = wb.ptq(model, calib, "w4a4", progress=False)
    assert plain.report.summary["layer_errors_on"] == "calib_data"
    with torch.no_grad():  # report_data changes what is measured, never the model
        assert torch.equal(with_held_out.model(digits.test_x), plain.model(digits.test_x))
    errors = with_held_out.report.layers["output_sqnr_db"]
    assert not np.allclose(errors, plain.report.layers["output_sqnr_db"], equal_nan=True)
    pd.testing.assert_frame_equal(with_held_out.report.storage, plain.report.storage)


def test_only_the_first_8_batches_of_report_data_are_read(model, calib, digits):
    many = [digits.test_x[i : i + 16] for i in range(0, 16 * 12, 16)]
    result = wb.ptq(model, calib, "w4a4", report_data=iter(many), progress=False)
    assert_errors_measured_on(result, many[:8])


def test_the_search_and_keep_n_measure_their_report_on_report_data(model, calib, held_out, digits):
    def eval_fn(m):  # the search's metric on held-out images too
        return accuracy(m, digits.test_x[128:], digits.test_y[128:])

    searched = wb.auto_mixed_precision(
        model, calib, eval_fn, 0.5, "w4a4", report_data=held_out, progress=False
    )
    assert_errors_measured_on(searched, held_out)
    kept = wb.keep_most_sensitive_fp32(
        model, calib, 1, "w4a4", report_data=held_out, progress=False
    )
    assert_errors_measured_on(kept, held_out)


def test_qat_measures_its_report_on_report_data(model, calib, held_out, digits):
    train = [(digits.train_x[i : i + 64], digits.train_y[i : i + 64]) for i in (0, 64)]
    result = wb.qat(
        model,
        train,
        "w4a4",
        loss_fn=nn.functional.cross_entropy,
        calib_data=calib,
        report_data=held_out,
        progress=False,
    )
    assert_errors_measured_on(result, held_out)


def test_dynamic_ptq_without_calibration_data_measures_on_report_data(held_out):
    result = wb.ptq(tiny_mlp(), config="int8-dynamic", report_data=held_out)
    assert_errors_measured_on(result, held_out)


@pytest.mark.parametrize(
    ("report_data", "message"),
    [
        ([], "report_data yielded 0 batches"),
        (3, "report_data of type int is not iterable"),
        ([torch.zeros(2, 1, 5, 5)], "batch 0 of report_data could not run through the model"),
    ],
    ids=["empty", "not iterable", "wrong shape"],
)
def test_bad_report_data_is_one_error_naming_it(model, calib, report_data, message):
    with pytest.raises(wb.CalibrationError, match=message):
        wb.ptq(model, calib, "w4a4", report_data=report_data, progress=False)


def test_magic_line_recipe_and_panel_pass_report_data(shell, model, calib, held_out):
    shell.user_ns["held"] = held_out
    by_line = shell.run_line_magic("quantize", "model --calib calib --report-data held")
    by_recipe = shell.run_cell_magic("quantize", "model", "calib: calib\nreport_data: held")
    app = wb.panel(model, calib, report_data=held_out)
    app.run_button.click()
    assert app.error == ""
    for result in (by_line, by_recipe, app.result):
        assert_errors_measured_on(result, held_out)
    from_magic = shell.run_line_magic("quantize", "model --calib calib --report-data held --panel")
    assert from_magic.report_data is held_out
