"""The panel's Sensitivity tab, "keep the N most sensitive layers FP32", auto mixed precision
and the Pareto view of the runs, driven headless.

References: ``wb.sensitivity`` / ``wb.ptq`` / ``wb.auto_mixed_precision`` called directly with
the config written out by hand, and Pareto dominance checked by brute force in the test.
"""

from __future__ import annotations

import re

import jsonschema
import pandas as pd
import pytest
import torch
from digits_models import tiny_cnn

import workbench as wb
from workbench.analysis.report_json import REPORT_MIME_TYPE, report_schema
from workbench.demo import accuracy
from workbench.notebook import actions
from workbench.notebook.panel import SENSITIVITY_TAB, WorkbenchPanel
from workbench.notebook.runs_table import RunsTable


def is_svg(view: str) -> bool:
    """An inline SVG chart in HTML (the panel's charts: sharp, in the theme's colours)."""
    return "<svg" in view and "</svg>" in view


INT3 = wb.QuantConfig(
    weight=wb.Scheme(3, symmetric=True, per_channel=True),
    activation=wb.Scheme(8, symmetric=False, per_channel=False),
)


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


@pytest.fixture(scope="module")
def eval_fn(digits):
    return lambda m: accuracy(m, digits.test_x, digits.test_y)


@pytest.fixture
def app(model, digits, eval_fn) -> WorkbenchPanel:
    app = wb.panel(model, digits.calib_batches(4, 32), eval_fn=eval_fn)
    app.bits.value = 3
    assert app.config() == INT3
    return app


@pytest.fixture(scope="module")
def int3_sensitivity(model, digits, eval_fn) -> pd.DataFrame:
    return wb.sensitivity(
        model, digits.calib_batches(4, 32), eval_fn=eval_fn, config=INT3, progress=False
    )


@pytest.fixture
def counted_sensitivity(monkeypatch):
    """Counts the panel's calls of ``actions.sensitivity``."""
    calls = []
    real = actions.sensitivity

    def counting(*args, **kwargs):
        calls.append(args[2])  # the config
        return real(*args, **kwargs)

    monkeypatch.setattr(actions, "sensitivity", counting)
    return calls


def test_sensitivity_button_fills_the_tab_one_row_per_quantized_layer(
    app, model, digits, int3_sensitivity
):
    app.sensitivity_button.click()
    assert app.error == ""
    table = app.sensitivity_table
    direct = wb.ptq(model, digits.calib_batches(4, 32), config=INT3, progress=False)
    layers = direct.report.layers
    quantized = set(layers.loc[layers["status"] == "quantized", "layer"])
    assert set(table["layer"]) == quantized == {"conv", "fc1", "fc2"}
    assert len(table) == len(quantized)
    pd.testing.assert_frame_equal(table, int3_sensitivity)
    assert app.sensitivity_html.value.count("<tr") == len(table) + 1  # header row
    assert "3 layers" in app.sensitivity_status.value
    assert app.sensitivity_plot.value == ""  # drawn when its tab is opened
    app.tabs.selected_index = SENSITIVITY_TAB
    chart = app.sensitivity_plot.value
    assert "<svg" in chart and "drop from FP32 (FP32" in chart
    # two bars per layer: only this quantized, all but this quantized
    assert chart.count('class="jp-WorkbenchReport-sensBar') == 2 * len(table)


def test_sensitivity_without_eval_fn_ranks_by_output_sqnr_with_a_progress_bar(model, digits):
    app = wb.panel(model, digits.calib_batches(4, 32))
    app.bits.value = 3
    progress = []
    app.sensitivity.progress.observe(lambda change: progress.append(change["new"]), "value")
    app.tabs.selected_index = SENSITIVITY_TAB
    app.sensitivity_button.click()
    assert app.error == ""
    table = app.sensitivity_table
    reference = wb.sensitivity(model, digits.calib_batches(4, 32), config=INT3, progress=False)
    pd.testing.assert_frame_equal(table, reference)
    assert table.attrs["metric"] == "output_sqnr_db"
    assert progress[-len(table) :] == list(range(1, len(table) + 1))
    assert app.sensitivity.progress.max == len(table)
    chart = app.sensitivity_plot.value
    assert "No eval_fn given" in chart and "SQNR against FP32" in chart
    widths = [
        float(w)
        for w in re.findall(r'class="jp-WorkbenchReport-sensBar[^"]*"[^>]*width="([\d.]+)"', chart)
    ]
    assert len(widths) == len(table) and all(w > 1.0 for w in widths)
    # lower SQNR first and a shorter bar: the chart follows the table's order
    assert widths == sorted(widths)
    html = app.sensitivity_html.value
    assert "Drop" not in html and "nan" not in html.lower() and "\u2014" not in html
    app.sensitivity.filter.value = table["layer"].iloc[-1]
    assert app.sensitivity_html.value.count("<tr") == 2
    app.sensitivity.filter.value = ""
    app.sensitivity.sort.value = "layer"
    shown = re.findall(r'<tr data-layer="([^"]+)"', app.sensitivity_html.value)
    assert shown == sorted(table["layer"])


def test_sensitivity_skips_the_layers_kept_fp32_by_hand(app):
    app.keep_fp32.value = ("fc1",)
    app.sensitivity_button.click()
    assert app.error == ""
    assert set(app.sensitivity_table["layer"]) == {"conv", "fc2"}


def test_keep_one_most_sensitive_layer_fp32_computes_the_ranking_first(
    app, model, digits, int3_sensitivity, counted_sensitivity
):
    top = int3_sensitivity.iloc[0]["layer"]
    assert app.keep_most_sensitive.max == 2  # of 3 layers: one at least stays quantized
    app.keep_most_sensitive.value = 1
    assert app.sensitivity_table is None
    app.run_button.click()
    assert app.error == ""
    assert counted_sensitivity == [INT3]  # no table yet: Run computed it (and shows it)
    pd.testing.assert_frame_equal(app.sensitivity_table, int3_sensitivity)
    layers = app.result.report.layers.set_index("layer")
    fp32 = set(layers.index[layers["status"] == "fp32"]) - {"bn"}  # bn is folded into conv
    assert fp32 == {top}
    assert layers.loc[top, "reason"] == "kept FP32: sensitivity rank 1 of 3"
    assert app.result.config.exclude == (top,)
    assert app.result.report.summary["kept_higher_precision"] == [top]
    assert app.runs.frame["kept_by_sensitivity"].tolist() == [top]
    expected = wb.ptq(
        model,
        digits.calib_batches(4, 32),
        config=wb.QuantConfig(weight=INT3.weight, activation=INT3.activation, exclude=(top,)),
        progress=False,
    )
    with torch.no_grad():
        assert torch.equal(app.result.model(digits.test_x), expected.model(digits.test_x))
    validator = jsonschema.Draft202012Validator(report_schema())
    bundle = app.result.report._repr_mimebundle_()
    validator.validate(bundle[REPORT_MIME_TYPE])  # the report's extra table and summary key
    app.run_button.click()  # same config: the ranking is reused
    assert counted_sensitivity == [INT3]
    app.bits.value = 4
    app.run_button.click()  # another config: ranked again
    assert len(counted_sensitivity) == 2 and counted_sensitivity[1].weight.bits == 4


def test_keep_n_uses_the_table_the_button_computed(app, counted_sensitivity):
    app.sensitivity_button.click()
    app.keep_most_sensitive.value = 2
    app.run_button.click()
    assert app.error == ""
    assert len(counted_sensitivity) == 1
    top_two = list(app.sensitivity_table["layer"].head(2))
    layers = app.result.report.layers.set_index("layer")
    assert (layers.loc[top_two, "status"] == "fp32").all()
    assert layers.loc[top_two[1], "reason"] == "kept FP32: sensitivity rank 2 of 3"


def test_sensitivity_error_is_one_line_and_panel_stays_usable(model, digits):
    calls = []

    def flaky_eval(m):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("accuracy needs labels\nsecond line")
        return 50.0

    app = wb.panel(model, digits.calib_batches(2, 32), eval_fn=flaky_eval)
    app.sensitivity_button.click()
    assert app.error == "ValueError: accuracy needs labels"
    assert "second line" not in app.sensitivity_status.value
    assert "accuracy needs labels" in app.sensitivity_status.value
    assert app.sensitivity_table is None
    assert not app.sensitivity_button.disabled and not app.run_button.disabled
    app.sensitivity_button.click()
    assert app.error == "" and len(app.sensitivity_table) == 3


def test_sensitivity_without_calibration_data_names_the_fix(model):
    app = wb.panel(model)
    app.sensitivity_button.click()
    assert app.error.startswith("sensitivity needs calibration data; pass calib_data")
    app.keep_most_sensitive.value = 1
    app.run_button.click()
    assert app.error.startswith("sensitivity needs calibration data")
    assert app.result is None


def test_auto_mixed_precision_from_the_panel(app, model, digits, eval_fn):
    assert app.max_drop.disabled  # until auto mixed precision is ticked
    app.mixed_precision.value = True
    app.max_drop.value = 0.5
    app.run_button.click()
    assert app.error == ""
    direct = wb.auto_mixed_precision(
        model, digits.calib_batches(4, 32), eval_fn, max_drop=0.5, config=INT3, progress=False
    )
    summary = app.result.report.summary
    assert summary["kept_higher_precision"] == direct.report.summary["kept_higher_precision"]
    pd.testing.assert_frame_equal(
        app.result.report.extra_tables["Mixed-precision search"],
        direct.report.extra_tables["Mixed-precision search"],
    )
    assert summary["metric_drop"] <= 0.5
    with torch.no_grad():
        assert torch.equal(app.result.model(digits.test_x), direct.model(digits.test_x))


def test_auto_mixed_precision_needs_an_eval_fn(model, digits):
    assert wb.panel(model, digits.calib_batches(1, 32)).mixed_precision.disabled


def test_auto_mixed_precision_with_qat_trains_with_the_searched_precisions(model, digits, eval_fn):
    calib = digits.calib_batches(4, 32)
    train = [(digits.train_x[i : i + 64], digits.train_y[i : i + 64]) for i in (0, 64)]
    app = wb.panel(model, calib, eval_fn, train, torch.nn.CrossEntropyLoss())
    app.method.value = "qat"
    app.bits.value = 3
    app.mixed_precision.value = True
    app.max_drop.value = 0.5
    app.run_button.click()
    assert app.error == ""
    direct = wb.auto_mixed_precision(model, calib, eval_fn, 0.5, config=INT3, progress=False)
    result = app.result
    kept = direct.report.summary["kept_higher_precision"]
    assert result.method == "qat" and result.config == direct.config
    assert result.report.summary["kept_higher_precision"] == kept
    assert result.report.summary["max_drop"] == 0.5
    for plan in result.plans:
        if plan.name in kept:
            assert (plan.weight_bits, plan.activation_bits, plan.precision) == (8, 8, "kept 8-bit")
        elif plan.status == "quantized":
            assert plan.weight_bits == 3


def dominated_by_another(frame: pd.DataFrame, latency: bool) -> list[bool]:
    """Brute force: is each run at least as bad as another run everywhere, worse somewhere?"""
    columns = [("metric", 1), ("size_bytes", -1)] + ([("int8_ms", -1)] if latency else [])
    result = []
    for _, run in frame.iterrows():
        result.append(
            any(
                all(sign * other[c] >= sign * run[c] for c, sign in columns)
                and any(sign * other[c] > sign * run[c] for c, sign in columns)
                for _, other in frame.iterrows()
            )
        )
    return result


def test_runs_table_marks_a_dominated_run(model, digits):
    app = wb.panel(model, digits.calib_batches(2, 32), eval_fn=lambda m: 50.0)
    for bits in (8, 4, 6):  # same metric, so the smallest run dominates the others
        app.bits.value = bits
        app.run_button.click()
        assert app.error == ""
    frame = app.runs.frame
    assert frame["pareto_optimal"].tolist() == [False, True, False]
    assert frame["pareto_optimal"].tolist() == [not d for d in dominated_by_another(frame, False)]
    assert "Pareto" in app.runs_html.value and "pareto_optimal" not in app.runs_html.value
    assert is_svg(app.runs_plot.value)


def summary(metric: float, size_bytes: int) -> dict:
    return {
        "metric_fp32": 99.0,
        "metric_quantized": metric,
        "quantized_bytes": size_bytes,
        "compression_ratio": 4.0,
    }


def test_runs_table_pareto_uses_latency_once_every_run_is_benchmarked():
    runs = RunsTable()
    for metric, size_bytes in [(97.0, 1000), (96.0, 2000), (98.0, 4000)]:
        runs.add("ptq", "int8", wb.QuantConfig(), summary(metric, size_bytes))
    assert runs.frame["pareto_optimal"].tolist() == [True, False, True]
    runs.set_latency(1, 2.0, 1.5)
    runs.set_latency(2, 2.0, 0.5)  # run 2 is the fastest now
    assert runs.frame["pareto_optimal"].tolist() == [True, False, True]  # run 3 not timed yet
    runs.set_latency(3, 2.0, 1.0)
    frame = runs.frame
    assert frame["pareto_optimal"].tolist() == [True, True, True]
    assert frame["pareto_optimal"].tolist() == [not d for d in dominated_by_another(frame, True)]


def test_runs_plot_draws_optimal_runs_apart():
    runs = RunsTable()
    for metric, size_bytes in [(97.0, 1024), (96.0, 2048), (98.0, 4096)]:
        runs.add("ptq", "int8", wb.QuantConfig(), summary(metric, size_bytes))
    figure = runs.plot()
    dominated, optimal = figure.axes[0].collections[:2]
    assert dominated.get_offsets().tolist() == [[2.0, 96.0]]
    assert optimal.get_offsets().tolist() == [[1.0, 97.0], [4.0, 98.0]]
    assert RunsTable().plot() is None
