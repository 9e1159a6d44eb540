"""``wb.keep_most_sensitive_fp32``: PTQ with the top of a sensitivity ranking kept FP32.

References: ``wb.sensitivity`` for the ranking, ``wb.ptq`` / ``wb.auto_mixed_precision`` with
the kept layers written into ``config.exclude`` by hand for the model.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch
from digits_models import tiny_cnn
from torch import nn

import workbench as wb
import workbench.workflows.mixed_precision as mixed_precision_module
from workbench.demo import accuracy

CONFIG = wb.QuantConfig.preset("w4a4")


def outlier_mlp() -> nn.Module:
    """Three Linear layers; the middle one has two input columns 60x larger than the rest."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).eval()
    with torch.no_grad():
        model[2].weight[:, :2] *= 60.0
    return model


@pytest.fixture(scope="module")
def data() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(32, 16) for _ in range(3)]


@pytest.fixture(scope="module")
def ranking(data) -> pd.DataFrame:
    return wb.sensitivity(outlier_mlp(), data, config=CONFIG, progress=False)


def by_layer(result: wb.QuantResult) -> pd.DataFrame:
    return result.report.layers.set_index("layer")


def assert_same_model(result: wb.QuantResult, reference: wb.QuantResult) -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 16)
    with torch.no_grad():
        assert torch.equal(result.model(x), reference.model(x))


@pytest.mark.parametrize("count", [1, 2])
def test_keeps_the_top_of_the_ranking_fp32_and_equals_ptq_with_them_excluded(data, ranking, count):
    model = outlier_mlp()
    result = wb.keep_most_sensitive_fp32(model, data, count, config=CONFIG, progress=False)
    top = list(ranking["layer"].head(count))
    layers = by_layer(result)
    assert set(layers.index[layers["status"] == "fp32"]) == set(top)
    assert set(layers.index[layers["status"] == "quantized"]) == set(ranking["layer"]) - set(top)
    for rank, name in enumerate(top, start=1):
        reason = f"kept FP32: sensitivity rank {rank} of 3"
        assert layers.loc[name, "reason"] == reason
        assert next(p for p in result.plans if p.name == name).reason == reason
    assert result.report.summary["kept_higher_precision"] == top
    assert result.config.exclude == tuple(top)
    pd.testing.assert_frame_equal(result.report.extra_tables["Sensitivity"], ranking)
    reference = wb.ptq(model, data, config=replace(CONFIG, exclude=tuple(top)), progress=False)
    assert_same_model(result, reference)
    assert result.report.summary["quantized_bytes"] == reference.report.summary["quantized_bytes"]


def test_reads_a_generator_once_for_the_ranking_and_the_quantization(data, ranking):
    result = wb.keep_most_sensitive_fp32(
        outlier_mlp(), (batch for batch in data), 1, config=CONFIG, progress=False
    )
    top = ranking.iloc[0]["layer"]
    assert result.report.summary["kept_higher_precision"] == [top]
    reference = wb.ptq(outlier_mlp(), data, config=replace(CONFIG, exclude=(top,)), progress=False)
    assert_same_model(result, reference)


def test_a_given_ranking_is_used_as_is_without_ranking_again(data, ranking, monkeypatch):
    def no_ranking(*args, **kwargs):
        raise AssertionError("wb.sensitivity called although a ranking was given")

    monkeypatch.setattr(mixed_precision_module, "sensitivity_report", no_ranking)
    reversed_ranking = ranking.iloc[::-1].reset_index(drop=True)
    last = reversed_ranking.iloc[0]["layer"]  # the least sensitive layer, ranked first here
    result = wb.keep_most_sensitive_fp32(
        outlier_mlp(), data, 1, config=CONFIG, sensitivity=reversed_ranking, progress=False
    )
    assert by_layer(result).loc[last, "status"] == "fp32"
    assert by_layer(result).loc[last, "reason"] == "kept FP32: sensitivity rank 1 of 3"
    assert result.report.extra_tables["Sensitivity"] is reversed_ranking


def test_with_max_drop_the_rest_is_searched_after_the_kept_layers(data, ranking):
    model = outlier_mlp()
    x = torch.cat(data)
    with torch.no_grad():
        target = model(x)

    def eval_fn(m):
        with torch.no_grad():
            return -float((m(x) - target).pow(2).mean())

    top = ranking.iloc[0]["layer"]
    result = wb.keep_most_sensitive_fp32(
        model, data, 1, config=CONFIG, eval_fn=eval_fn, max_drop=0.0, progress=False
    )
    reference = wb.auto_mixed_precision(
        model, data, eval_fn, max_drop=0.0, config=replace(CONFIG, exclude=(top,)), progress=False
    )
    searched = reference.report.summary["kept_higher_precision"]
    assert result.report.summary["kept_higher_precision"] == [top, *searched]
    assert by_layer(result).loc[top, "reason"] == "kept FP32: sensitivity rank 1 of 3"
    tables = result.report.extra_tables
    assert top not in set(tables["Sensitivity"]["layer"])  # the search ranks the rest
    assert list(tables["Sensitivity (all layers)"]["layer"]) == list(ranking["layer"])
    pd.testing.assert_frame_equal(
        tables["Mixed-precision search"], reference.report.extra_tables["Mixed-precision search"]
    )
    assert_same_model(result, reference)


def test_mistakes_name_the_fix(data, ranking):
    model = outlier_mlp()
    with pytest.raises(wb.ConfigError, match=r"count must be between 0 and 2 .* got 3"):
        wb.keep_most_sensitive_fp32(model, data, 3, config=CONFIG, sensitivity=ranking)
    stale = ranking.assign(layer=["fc", "0", "2"])
    with pytest.raises(wb.ConfigError, match=r"names layer 'fc'.* pass the table wb\.sensitivity"):
        wb.keep_most_sensitive_fp32(model, data, 1, config=CONFIG, sensitivity=stale)
    with pytest.raises(wb.ConfigError, match="needs eval_fn"):
        wb.keep_most_sensitive_fp32(model, data, 1, config=CONFIG, max_drop=0.5)
    with pytest.raises(wb.ConfigError, match=r"sensitivity must be the table wb\.sensitivity"):
        wb.keep_most_sensitive_fp32(model, data, 1, config=CONFIG, sensitivity=[("0", 1.0)])


def test_panel_keep_n_with_auto_mixed_precision_calls_the_workflow(digits):
    model = tiny_cnn()

    def eval_fn(m):
        return accuracy(m, digits.test_x, digits.test_y)

    app = wb.panel(model, digits.calib_batches(4, 32), eval_fn=eval_fn)
    app.bits.value = 3
    app.keep_most_sensitive.value = 1
    app.mixed_precision.value = True
    app.max_drop.value = 0.5
    app.run_button.click()
    assert app.error == ""
    direct = wb.keep_most_sensitive_fp32(
        model,
        digits.calib_batches(4, 32),
        1,
        config=app.config(),
        eval_fn=eval_fn,
        sensitivity=app.sensitivity_table,
        max_drop=0.5,
        progress=False,
    )
    summary = app.result.report.summary
    assert summary["kept_higher_precision"] == direct.report.summary["kept_higher_precision"]
    top = app.sensitivity_table.iloc[0]["layer"]
    assert summary["kept_higher_precision"][0] == top
    assert app.runs.frame["fp32_layers"].tolist() == [top]
    with torch.no_grad():
        assert torch.equal(app.result.model(digits.test_x), direct.model(digits.test_x))


def test_panel_keep_n_with_qat_trains_with_the_top_layer_fp32(digits):
    model = tiny_cnn()
    app = wb.panel(
        model,
        digits.calib_batches(2, 32),
        train_data=[(digits.train_x[i : i + 32], digits.train_y[i : i + 32]) for i in (0, 32)],
        loss_fn=nn.CrossEntropyLoss(),
    )
    app.method.value = "qat"
    app.keep_most_sensitive.value = 1
    app.run_button.click()
    assert app.error == ""
    top = app.sensitivity_table.iloc[0]["layer"]  # ranked first, then kept and trained
    result = app.result
    assert result.method == "qat" and result.config.exclude == (top,)
    plan = next(p for p in result.plans if p.name == top)
    assert plan.precision == "kept FP32" and plan.reason.startswith("kept FP32: sensitivity rank 1")
    assert result.report.summary["kept_higher_precision"] == [top]
    assert app.runs.frame["fp32_layers"].tolist() == [top]
    assert type(result.model.get_submodule(top)) is type(model.get_submodule(top))
