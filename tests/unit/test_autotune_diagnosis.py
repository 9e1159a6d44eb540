"""The facts that choose autotune's methods, against direct measurements."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.analysis.diagnosis import (
    OUTLIER_RATIO,
    depthwise_convs,
    input_channel_ranges,
    input_outliers,
    weight_error_dominates,
)
from workbench.workflows.autotune_space import Candidate, Diagnosis, method_candidates


def test_planted_outlier_channel_is_found_with_its_ratio():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    batches = [torch.randn(32, 16) for _ in range(3)]
    for batch in batches:
        batch[:, 5] *= 60.0
    ranges = input_channel_ranges(model, batches)
    first = ranges.set_index("layer").loc["0"]
    amax = torch.stack(batches).abs().amax(dim=(0, 1))  # independent: all inputs at once
    assert first["widest_channel"] == 5
    assert first["outlier_ratio"] == pytest.approx(float(amax.max() / amax.median()), rel=1e-6)
    found = input_outliers(ranges)
    assert found is not None and found.layer == "0" and found.channel == 5
    quiet = input_channel_ranges(model, [torch.randn(32, 16)])
    assert quiet["outlier_ratio"].max() < OUTLIER_RATIO
    assert input_outliers(quiet) is None


def test_depthwise_convs_are_named():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=2)
    )
    assert depthwise_convs(model) == ["1"]


def test_weight_error_dominates_reads_the_layer_table():
    table = pd.DataFrame(
        {
            "status": ["quantized"] * 3 + ["fp32"],
            "activation_bits": [8, 8, 8, None],
            "weight_sqnr_db": [20.0, 21.0, 40.0, None],
            "layer_sqnr_db": [19.5, 20.0, 10.0, None],
        }
    )
    assert weight_error_dominates(table)  # median gap 1 dB
    table["layer_sqnr_db"] = [5.0, 6.0, 10.0, None]
    assert not weight_error_dominates(table)  # the inputs' error dominates


def test_methods_follow_the_diagnosis():
    base = Candidate("int8", "preset", wb.QuantConfig.preset("int8"), "preset")
    outliers = input_outliers(
        pd.DataFrame(
            [{"layer": "q", "channels": 4, "widest_channel": 2, "widest_max_abs": 90.0,
              "median_max_abs": 1.0, "outlier_ratio": 90.0}]
        )
    )  # fmt: skip
    names = lambda diagnosis: [c.name for c in method_candidates(base, diagnosis)]  # noqa: E731
    assert names(Diagnosis(outliers, (), False, True)) == [
        "int8 + SmoothQuant 0.5",
        "int8 + SmoothQuant auto",
    ]
    assert names(Diagnosis(None, ("dw",), False, False)) == ["int8 + CLE + bias correction"]
    assert names(Diagnosis(None, (), True, True)) == [
        "int8 + AdaRound",
        "int8 + GPTQ",
        "int8 + AdaRound + bias correction",
    ]
