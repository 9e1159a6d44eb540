"""Sensitivity analysis, mixed precision and the Pareto table."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import workbench as wb
import workbench.workflows.sensitivity as sensitivity_module
from workbench.engine.quantizers.modules import WeightQuantizer


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).eval()


def test_sensitivity_calibrates_once_and_bounds_eval_calls(monkeypatch):
    model = small_mlp()
    calls = {"calibrate": 0, "eval": 0}
    real_calibrate = sensitivity_module.calibrate

    def counting_calibrate(*args, **kwargs):
        calls["calibrate"] += 1
        return real_calibrate(*args, **kwargs)

    monkeypatch.setattr(sensitivity_module, "calibrate", counting_calibrate)
    data = torch.randn(64, 16)

    def eval_fn(m):
        calls["eval"] += 1
        with torch.no_grad():
            return -float((m(data) - model(data)).pow(2).mean())

    table = wb.sensitivity(
        model, [data[:32], data[32:]], eval_fn=eval_fn, config="w4a4", progress=False
    )
    layers = 3
    assert calls["calibrate"] == 1
    assert calls["eval"] <= 2 * layers + 1
    assert table.attrs["eval_calls"] == calls["eval"]
    assert sorted(table["layer"]) == ["0", "2", "4"]
    # every layer quantized alone costs something against the FP32 metric (0.0)
    assert (table["metric_only_this_quantized"] < 0).all()
    assert (table["drop_only_this"] > 0).all()


def test_sensitivity_ranks_a_layer_with_weight_outliers_first():
    model = small_mlp()
    with torch.no_grad():
        model[2].weight[:, :2] *= 60.0  # two input columns dominate every row's range
    table = wb.sensitivity(model, torch.randn(64, 16), config="int4-weight", progress=False)
    assert table.iloc[0]["layer"] == "2"
    assert table.attrs["metric"] == "output_sqnr_db"
    assert math.isinf(table.attrs["metric_fp32"])


def test_sensitivity_leaves_input_model_untouched():
    model = small_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wb.sensitivity(model, torch.randn(32, 16), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_auto_mixed_precision_falls_back_to_fp32_for_int8_configs():
    model = small_mlp()
    with torch.no_grad():
        model[2].weight[:, :2] *= 200.0
    data = torch.randn(128, 16)
    reference = model(data).detach()

    def eval_fn(m):
        with torch.no_grad():
            return float(nn.functional.cosine_similarity(m(data), reference).mean()) * 100

    res = wb.auto_mixed_precision(
        model, [data], eval_fn, max_drop=2.0, config="int8-per-tensor", progress=False
    )
    kept = res.report.summary["kept_higher_precision"]
    assert kept == ["2"], "exactly the outlier layer must be kept in higher precision"
    row = res.report.layers.set_index("layer").loc["2"]
    assert row["status"] == "fp32" and "kept FP32" in row["reason"]
    search = res.report.extra_tables["Mixed-precision search"]
    assert search.iloc[0]["drop"] > 2.0 >= search[search["step"] != "config"]["drop"].min()
    growing = search[~search["step"].str.startswith("drop")]
    assert list(growing["layers_kept"]) == list(range(len(growing)))
    # the search measured exactly the model it returns
    chosen = search[search["kept"] == ", ".join(kept)].iloc[-1]
    assert chosen["metric"] == pytest.approx(res.report.summary["metric_quantized"])


def test_auto_mixed_precision_measures_the_fp32_model_once():
    model = small_mlp()
    data = torch.randn(64, 16)
    reference = model(data).detach()
    evaluated: list[nn.Module] = []

    def eval_fn(m):
        evaluated.append(m)
        with torch.no_grad():
            return -float((m(data) - reference).pow(2).mean())

    res = wb.auto_mixed_precision(
        model, [data], eval_fn, max_drop=1e-9, config="w4a4", progress=False
    )
    # the FP32 metric once, on an eval-mode copy: the user's model itself is never run
    assert not any(m is model for m in evaluated)
    assert sum(not any(isinstance(x, WeightQuantizer) for x in m.modules()) for m in evaluated) == 1
    assert res.report.summary["metric_fp32"] == 0.0
    search = res.report.extra_tables["Mixed-precision search"]
    # sensitivity (at most 2 x 3 layers), the search's steps, the final report's quantized metric
    assert len(evaluated) <= 1 + 2 * 3 + len(search) + 1


def test_auto_mixed_precision_needs_an_eval_fn():
    with pytest.raises(wb.ConfigError, match="eval_fn"):
        wb.auto_mixed_precision(small_mlp(), torch.randn(8, 16), None)


def test_pareto_table_marks_non_dominated_runs():
    runs = [
        {"run": "a", "metric": 98.0, "size_bytes": 1000},
        {"run": "b", "metric": 97.0, "size_bytes": 2000},  # worse and bigger than a
        {"run": "c", "metric": 96.0, "size_bytes": 500},
        {"run": "d", "metric": 99.0, "size_bytes": 4000},
    ]
    table = wb.pareto_table(runs)
    assert dict(zip(table["run"], table["pareto_optimal"], strict=True)) == {
        "a": True,
        "b": False,
        "c": True,
        "d": True,
    }
    with_latency = wb.pareto_table(
        [r | {"latency_ms": lat} for r, lat in zip(runs, [5.0, 1.0, 9.0, 9.0], strict=True)]
    )
    # b is now the fastest run, so nothing dominates it
    assert bool(with_latency.set_index("run").loc["b", "pareto_optimal"])


def test_sensitivity_without_eval_fn_is_the_output_sqnr_with_only_that_layer_quantized():
    """Without eval_fn the ranking is the model output's SQNR / cosine against FP32, checked
    against the model rebuilt by hand with one layer's weights through torch's fake quant;
    ``on_layer`` reports every layer."""
    import copy

    model = small_mlp()
    data = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    config = wb.QuantConfig(weight=wb.Scheme(4, symmetric=True, per_channel=True), activation=None)
    seen = []
    table = wb.sensitivity(
        model, data, config=config, progress=False, on_layer=lambda d, n: seen.append((d, n))
    )
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert table.attrs["metric"] == "output_sqnr_db" and table["drop_only_this"].isna().all()
    with torch.no_grad():
        reference = model(data)
        for _, row in table.iterrows():
            by_hand = copy.deepcopy(model)
            layer = by_hand[int(row["layer"])]
            scale = layer.weight.abs().amax(dim=1) / 7
            zero = torch.zeros_like(scale, dtype=torch.int32)
            layer.weight.copy_(
                torch.fake_quantize_per_channel_affine(layer.weight, scale, zero, 0, -8, 7)
            )
            out = by_hand(data)
            noise = (reference - out).pow(2).sum()
            sqnr = 10 * math.log10(float(reference.pow(2).sum() / noise))
            flat = reference.flatten(), out.flatten()
            cosine = float(torch.nn.functional.cosine_similarity(*flat, 0))
            assert row["metric_only_this_quantized"] == pytest.approx(sqnr, abs=0.01)
            assert row["output_cosine_only_this"] == pytest.approx(cosine, abs=1e-5)
    assert list(table["metric_only_this_quantized"]) == sorted(table["metric_only_this_quantized"])
