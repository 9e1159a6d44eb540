"""The mixed-precision search on a CNN with one damaged layer: it meets its budget keeping
that layer whole-path 8-bit, or says it cannot; QAT with ``max_drop`` / ``keep_most_sensitive``
trains with the precisions the search chose."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

import workbench as wb
from tests.unit.digits_models import tiny_cnn
from tests.unit.model_guard import Snapshot
from workbench.demo import accuracy, load_digits_data
from workbench.engine.quantizers.modules import ActivationQuantizer
from workbench.workflows.precision_search import higher_precision_config, kept_config


@pytest.fixture(scope="module")
def damaged():
    """tiny_cnn whose conv channel 0 is dead after its ReLU and whose fc1 has outlier weights
    (10x its largest) on exactly the 16 inputs that channel feeds: the FP32 function ignores
    them, but they set every per-channel 4-bit scale of fc1, which then rounds its real weights
    to zero."""
    data = load_digits_data()
    model = tiny_cnn()
    with torch.no_grad():
        model.bn.bias[0] = -1e3
    head = list(model.fc1.parameters()) + list(model.fc2.parameters())
    optimizer = torch.optim.Adam(head, lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.train_x), data.train_y).backward()
        optimizer.step()
    with torch.no_grad():
        model.fc1.weight[:, :16] = 10 * model.fc1.weight.abs().max()
    calib = [data.train_x[i : i + 128] for i in range(0, 512, 128)]

    def eval_fn(m):
        return accuracy(m, data.test_x, data.test_y)

    return model.eval(), calib, eval_fn, data


@pytest.fixture(scope="module")
def searched(damaged):
    model, calib, eval_fn, _ = damaged
    return wb.auto_mixed_precision(model, calib, eval_fn, 0.5, "w4a4", progress=False)


def test_the_search_meets_the_budget_keeping_the_damaged_layer_at_8_bits(damaged, searched):
    model, calib, eval_fn, _ = damaged
    plain = wb.ptq(model, calib, "w4a4", eval_fn=eval_fn, progress=False)
    assert plain.report.summary["metric_drop"] > 5.0  # the damage shows at 4 bits
    result = searched
    summary = result.report.summary
    assert summary["budget_met"] is True and summary["metric_drop"] <= 0.5
    kept = summary["kept_higher_precision"]
    assert "fc1" in kept and len(kept) < summary["layers_quantized"]
    layers = result.report.layers.set_index("layer")
    for name in kept:
        assert layers.loc[name, "weight_bits"] == 8 and layers.loc[name, "activation_bits"] == 8
        assert layers.loc[name, "precision"] == "kept 8-bit"
    # the whole path into a kept layer is 8-bit: the quantizer its input shares too
    fc1_input = result.model.fc1.input_quantizer
    assert fc1_input.scheme.bits == 8
    assert result.model.get_submodule(fc1_input.shares_scale_of).scheme.bits == 8
    # the metric is the returned model's, and the config says what it is
    assert eval_fn(result.model) == pytest.approx(summary["metric_quantized"])
    assert set(result.config.overrides) == set(kept)
    search = result.report.extra_tables["Mixed-precision search"]
    assert (search["drop"] <= 0.5).any()


def test_no_assignment_within_budget_warns_and_returns_the_best(damaged):
    model, calib, _, data = damaged
    with torch.no_grad():
        reference = model(data.test_x)

    def closeness(m):  # 0 for the FP32 model, below 0 for any quantized one
        with torch.no_grad():
            return -float(((m(data.test_x) - reference) ** 2).mean())

    with pytest.warns(UserWarning, match="no assignment meets max_drop=0"):
        result = wb.auto_mixed_precision(model, calib, closeness, 0.0, "w4a4", progress=False)
    summary = result.report.summary
    search = result.report.extra_tables["Mixed-precision search"]
    assert summary["budget_met"] is False
    assert list(search["layers_kept"]) == [0, 1, 2, 3]  # every step tried, none dropped
    assert (search["drop"] > 0).all()
    assert summary["metric_drop"] == pytest.approx(search["drop"].min())
    best = search.loc[search["drop"].idxmin(), "kept"]
    assert ", ".join(summary["kept_higher_precision"]) == best


def test_every_layer_kept_is_exactly_the_int8_model(damaged):
    model, calib, eval_fn, data = damaged
    low = wb.QuantConfig.preset("w4a4")
    everything = kept_config(low, higher_precision_config(low), ["conv", "fc1", "fc2"])
    kept = wb.ptq(model, calib, everything, progress=False)
    int8 = wb.ptq(model, calib, "int8", progress=False)
    schemes = [m.scheme for m in kept.model.modules() if isinstance(m, ActivationQuantizer)]
    assert schemes == [m.scheme for m in int8.model.modules() if isinstance(m, ActivationQuantizer)]
    with torch.no_grad():
        assert torch.equal(kept.model(data.test_x), int8.model(data.test_x))
    assert eval_fn(kept.model) == eval_fn(int8.model)


def train_batches(data, count=2):
    starts = range(0, 128 * count, 128)
    return [(data.train_x[i : i + 128], data.train_y[i : i + 128]) for i in starts]


def test_qat_with_max_drop_trains_the_layers_the_search_kept_at_8_bits(damaged, searched):
    model, calib, eval_fn, data = damaged
    train = train_batches(data)
    snapshot = Snapshot(model, calib, train)
    result = wb.qat(
        model,
        train,
        "w4a4",
        loss_fn=nn.functional.cross_entropy,
        eval_fn=eval_fn,
        calib_data=calib,
        lr=1e-4,
        max_drop=0.5,
        progress=False,
    )
    snapshot.assert_unchanged()
    kept = searched.report.summary["kept_higher_precision"]  # the same search, same batches
    summary = result.report.summary
    assert result.method == "qat" and summary["kept_higher_precision"] == kept
    assert result.config == searched.config
    plans = {plan.name: plan for plan in result.plans}
    for name in ("conv", "fc1", "fc2"):
        if name in kept:
            assert (plans[name].weight_bits, plans[name].activation_bits) == (8, 8)
            assert plans[name].kept_bits == 8 and plans[name].precision == "kept 8-bit"
            assert plans[name].reason.startswith("kept 8-bit: sensitivity rank")
        else:
            assert (plans[name].weight_bits, plans[name].activation_bits) == (4, 4)
            assert plans[name].precision == "quantized"
        layer = result.model.get_submodule(name)
        assert layer.weight_quantizer.scheme.bits == plans[name].weight_bits
        assert layer.input_quantizer.scheme.bits == plans[name].activation_bits
    layers = result.report.layers.set_index("layer")
    assert list(layers.loc[["conv", "fc1", "fc2"], "weight_bits"]) == [
        plans[n].weight_bits for n in ("conv", "fc1", "fc2")
    ]
    pd.testing.assert_frame_equal(
        result.report.extra_tables["Mixed-precision search"],
        searched.report.extra_tables["Mixed-precision search"],
    )
    assert summary["search_budget_met"] is True and summary["max_drop"] == 0.5
    assert summary["metric_quantized"] == pytest.approx(eval_fn(result.model))
    assert summary["budget_met"] is (summary["metric_drop"] <= 0.5)


def test_qat_keeping_the_most_sensitive_layer_trains_it_in_fp32(damaged):
    model, calib, _, data = damaged
    ranking = pd.DataFrame({"layer": ["fc2", "fc1", "conv"]})  # a given ranking, used as is
    result = wb.qat(
        model,
        train_batches(data, 1),
        "w4a4",
        loss_fn=nn.functional.cross_entropy,
        calib_data=calib,
        keep_most_sensitive=1,
        sensitivity=ranking,
        progress=False,
    )
    assert result.config.exclude == ("fc2",)
    plans = {plan.name: plan for plan in result.plans}
    assert plans["fc2"].precision == "kept FP32" and plans["fc2"].weight_bits is None
    assert plans["fc2"].reason == "kept FP32: sensitivity rank 1 of 3"
    assert isinstance(result.model.fc2, nn.Linear)  # the FP32 layer itself, no quantizer
    assert [plans[n].weight_bits for n in ("conv", "fc1")] == [4, 4]
    assert result.report.summary["kept_higher_precision"] == ["fc2"]
    assert result.report.extra_tables["Sensitivity"] is ranking


def test_qat_search_options_are_checked_before_any_data_is_read(damaged):
    model, _, _, _ = damaged

    def never_read():
        raise AssertionError("train_data read before the options were checked")
        yield

    with pytest.raises(wb.ConfigError, match=r"wb\.qat with max_drop needs eval_fn"):
        wb.qat(model, never_read(), loss_fn=nn.functional.cross_entropy, max_drop=0.5)
    with pytest.raises(wb.ConfigError, match="keep_most_sensitive must be >= 0"):
        wb.qat(model, never_read(), loss_fn=nn.functional.cross_entropy, keep_most_sensitive=-1)
