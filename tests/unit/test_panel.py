"""The workbench panel, driven headless: set widget values, click, assert on state.

References: the config is compared with a QuantConfig written out by hand, the result with
``wb.ptq`` called directly, the Layers table with the model's own parameter-holding modules.
"""

from __future__ import annotations

import re

import pytest
import torch
from digits_models import tiny_cnn
from torch import nn

import workbench as wb
from workbench.analysis.html.format import format_bytes
from workbench.analysis.report_json import REPORT_MIME_TYPE
from workbench.demo import accuracy
from workbench.notebook.panel import PLOTS_TAB, WorkbenchPanel


def is_svg(view: str) -> bool:
    """An inline SVG chart in HTML (the panel's charts: sharp, in the theme's colours)."""
    return "<svg" in view and "</svg>" in view


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


@pytest.fixture
def app(model, digits) -> WorkbenchPanel:
    train = [(digits.train_x[i : i + 32], digits.train_y[i : i + 32]) for i in range(0, 96, 32)]
    return wb.panel(
        model,
        digits.calib_batches(4, 32),
        eval_fn=lambda m: accuracy(m, digits.test_x, digits.test_y),
        train_data=train,
        loss_fn=nn.CrossEntropyLoss(),
    )


def displayed(output) -> dict:
    """What an Output widget shows: the data of its one display."""
    (shown,) = output.outputs
    return shown["data"]


def body(page: str) -> str:
    return re.sub(r"<style>.*?</style>", "", page, flags=re.S)


def parameter_holding_modules(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if list(m.parameters(recurse=False))}


def test_controls_start_from_the_preset_and_follow_it(app):
    assert app.config() == wb.QuantConfig.preset("int8")
    assert app.keep_fp32.options == ("conv", "fc1", "fc2")
    app.preset.value = "int4-weight"
    assert (app.bits.value, app.symmetric.value, app.per_channel.value) == (4, True, True)
    app.preset.value = "int8-per-tensor"
    assert (app.bits.value, app.per_channel.value) == (8, False)
    assert app.num_batches.value == 4


def test_run_result_config_matches_controls(app, model, digits):
    app.preset.value = "int8"
    app.bits.value = 6
    app.symmetric.value = False
    app.per_channel.value = False
    app.observer.value = "percentile"
    app.keep_fp32.value = ("fc2",)
    app.num_batches.value = 2
    app.run_button.click()
    assert app.error == ""
    expected = wb.QuantConfig(
        weight=wb.Scheme(6, symmetric=False, per_channel=False),
        activation=wb.Scheme(8, symmetric=False, per_channel=False),
        observer="percentile",
        exclude=("fc2",),
    )
    assert app.result.config == expected
    direct = wb.ptq(model, digits.calib_batches(2, 32), config=expected, progress=False)
    with torch.no_grad():
        assert torch.equal(app.result.model(digits.test_x), direct.model(digits.test_x))
    layers = app.result.report.layers.set_index("layer")
    assert layers.loc["fc2", "status"] == "fp32"


def test_layers_tab_has_one_row_per_layer_worst_first(app, model):
    app.run_button.click()
    table = app.layers_table
    assert set(table["layer"]) == parameter_holding_modules(model)
    assert len(table) == len(parameter_holding_modules(model))
    quantized = table[table["status"] == "quantized"]["output_sqnr_db"].astype(float).tolist()
    assert quantized == sorted(quantized)
    assert table["status"].tolist()[: len(quantized)] == ["quantized"] * len(quantized)
    shown = displayed(app.layers_view)
    assert shown[REPORT_MIME_TYPE]["sections"] == ["chart", "layers"]
    # in model order: the folded BatchNorm right after the conv it was folded into
    in_model = [name for name, _ in model.named_modules() if name in set(table["layer"])]
    assert [row["layer"] for row in shown[REPORT_MIME_TYPE]["layers"]] == in_model
    assert shown["text/html"].count("data-index=") == len(table)  # one table row per layer


def test_runs_table_grows_by_one_per_run(app):
    configs = []
    for bits in (8, 4, 3):
        app.bits.value = bits
        app.run_button.click()
        configs.append(app.result.config)
        assert len(app.runs) == len(configs)
    frame = app.runs.frame
    assert frame["run"].tolist() == [1, 2, 3]
    assert frame["weights"].tolist() == [c.weight.describe() for c in configs]
    assert frame["size_bytes"].is_monotonic_decreasing
    assert frame["metric_fp32"].nunique() == 1
    assert app.runs_html.value.count("<tr") == 4
    assert is_svg(app.runs_plot.value)


def test_failing_run_shows_one_line_and_panel_stays_usable(model, digits):
    calls = []

    def flaky_eval(m):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("accuracy needs labels\nsecond line of the message")
        return 50.0

    app = wb.panel(model, digits.calib_batches(2, 32), eval_fn=flaky_eval)
    app.run_button.click()
    assert app.error == "ValueError: accuracy needs labels"
    assert "second line" not in app.status.value
    assert app.result is None
    assert len(app.runs) == 0
    assert app.run_button.disabled is False
    assert app.progress.layout.display == "none"
    app.run_button.click()
    assert app.error == ""
    assert app.result is not None
    assert len(app.runs) == 1


def test_qat_without_training_data_is_an_error_in_the_panel(model, digits):
    app = wb.panel(model, digits.calib_batches(2, 32))
    app.method.value = "qat"
    app.run_button.click()
    assert app.error.startswith("QAT needs train_data and loss_fn")
    assert "\n" not in app.error
    app.method.value = "ptq"
    app.run_button.click()
    assert app.error == "" and len(app.runs) == 1


def test_run_button_disabled_and_progress_shown_while_running(model, digits):
    seen = []
    app = None

    def eval_fn(m):
        seen.append((app.run_button.disabled, app.progress.layout.display))
        return 1.0

    app = wb.panel(model, digits.calib_batches(2, 32), eval_fn=eval_fn)
    assert app.progress.layout.display == "none"
    app.run_button.click()
    assert seen and all(state == (True, None) for state in seen)
    assert app.run_button.disabled is False
    assert app.progress.value == app.progress.max


def test_qat_run_uses_epochs_and_lr(app):
    app.method.value = "qat"
    assert app.epochs.disabled is False and app.num_batches.disabled is True
    app.epochs.value = 2
    app.lr.value = 1e-3
    app.run_button.click()
    assert app.error == ""
    assert app.result.method == "qat"
    assert len(app.result.history) == 2 * len(app.train_data)
    assert app.runs.frame["method"].tolist() == ["QAT"]


def test_plots_are_drawn_when_their_tab_is_opened(app):
    app.run_button.click()
    assert app.plots_view.outputs == ()
    assert app.runs_view.box.layout.display is None  # shown from the first run on
    app.tabs.selected_index = PLOTS_TAB
    shown = displayed(app.plots_view)
    assert shown[REPORT_MIME_TYPE]["sections"] == ["chart", "storage"]
    assert "<svg" in shown["text/html"] and "jp-WorkbenchReport-storageRow" in shown["text/html"]
    app.bits.value = 4
    app.run_button.click()  # the Plots tab is open: redrawn at once
    assert "weights int4" in displayed(app.plots_view)[REPORT_MIME_TYPE]["summary"]["config"]


def test_summary_and_storage_tabs_show_the_result(app):
    app.run_button.click()
    summary = app.result.report.summary
    shown = displayed(app.summary_view)
    assert shown[REPORT_MIME_TYPE]["summary"]["quantized_bytes"] == summary["quantized_bytes"]
    assert format_bytes(summary["quantized_bytes"]) in shown["text/html"]
    assert "jp-WorkbenchReport-layerTable" not in body(shown["text/html"])
    storage = displayed(app.storage_view)
    rows = len(re.findall(r'class="jp-WorkbenchReport-storageRow[" ]', storage["text/html"]))
    assert rows == len(app.result.report.storage)  # one per layer and the total


def test_panel_refuses_what_is_not_a_model(digits):
    with pytest.raises(wb.ModelError, match=r"needs a torch\.nn\.Module"):
        wb.panel([1, 2], digits.calib_batches(1))


def test_panel_displays_as_a_widget(app):
    bundle = app._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"] == "WorkbenchPanel(Sequential, 0 runs, no run yet)"
    assert "run this cell again" in bundle["text/html"]  # shown where widgets cannot be
    app.run_button.click()
    page = body(app._repr_mimebundle_()["text/html"])
    assert "jp-WorkbenchReport-cards" in page and "Pareto" in page  # the latest result


def test_export_and_benchmark_buttons(app, tmp_path):
    assert app.export_button.disabled and app.bench_button.disabled  # nothing to export yet
    app.run_button.click()
    assert not app.export_button.disabled
    path = tmp_path / "panel_int8.onnx"
    app.export_path.value = str(path)
    app.export_button.click()
    assert app.error == ""
    assert app.onnx_path == path and path.is_file()
    assert f"{path.stat().st_size:,} B" in app.export_status.value
    quantized = (app.result.report.layers["status"] == "quantized").sum()
    assert app.fusion_html.value.count("<tr") == quantized + 1  # one row per quantized layer
    app.bench_button.click()
    assert app.error == ""
    table = app.benchmark.table.set_index("model")
    assert table.loc["int8", "file_bytes"] == path.stat().st_size
    row = app.runs.frame.iloc[-1]
    assert row["fp32_ms"] == table.loc["fp32", "latency_p50_ms"]
    assert row["int8_ms"] == table.loc["int8", "latency_p50_ms"]
    assert row["speedup"] == pytest.approx(row["fp32_ms"] / row["int8_ms"])
    assert app.bench_html.value.count("<tr") == len(table) + 1


def test_benchmark_before_export_exports_first(app, tmp_path):
    app.run_button.click()
    app.export_path.value = str(tmp_path / "first.onnx")
    app.bench_button.click()
    assert app.error == ""
    assert (tmp_path / "first.onnx").is_file()
    assert app.runs.frame["int8_ms"].notna().all()


def test_export_error_is_one_line_and_panel_stays_usable(app, tmp_path):
    app.run_button.click()
    app.export_path.value = str(tmp_path)  # a directory
    app.export_button.click()
    assert "is a directory" in app.error and "\n" not in app.error
    assert "is a directory" in app.export_status.value
    assert app.onnx_path is None
    assert not app.export_button.disabled and not app.run_button.disabled
    app.export_path.value = str(tmp_path / "ok.onnx")
    app.export_button.click()
    assert app.error == "" and (tmp_path / "ok.onnx").is_file()


def test_smoothquant_off_reads_off_and_layer_lists_fit_their_names(app):
    assert app.smoothquant.label == "off" and app.smoothquant.value is None
    app.smoothquant.value = 0.5
    app.smoothquant.value = None
    assert app.smoothquant.label == "off"
    assert app.config() == wb.QuantConfig.preset("int8")  # "off" is no SmoothQuant
    longest = max(len(name) for name in app.keep_fp32.options)
    for select in (app.keep_fp32, app.layer_precision.layers):
        width = float(re.findall(r"([\d.]+)px", select.layout.width)[-1])
        assert width >= 190 + 7.5 * longest  # the description, then the whole name
