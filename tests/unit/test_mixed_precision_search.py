"""The mixed-precision search on a CNN with one damaged layer: it meets its budget keeping
that layer whole-path 8-bit, or says it cannot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import workbench as wb
from tests.unit.digits_models import tiny_cnn
from workbench.demo import accuracy, load_digits_data
from workbench.engine.quantizers import ActivationQuantizer
from workbench.workflows.mixed_precision import higher_precision_config, kept_config


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


def test_the_search_meets_the_budget_keeping_the_damaged_layer_at_8_bits(damaged):
    model, calib, eval_fn, _ = damaged
    plain = wb.ptq(model, calib, "w4a4", eval_fn=eval_fn, progress=False)
    assert plain.report.summary["metric_drop"] > 5.0  # the damage shows at 4 bits
    result = wb.auto_mixed_precision(model, calib, eval_fn, 0.5, "w4a4", progress=False)
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
