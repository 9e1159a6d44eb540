"""The report says per layer what SmoothQuant did: a ``smoothing`` column built from the plan's
fields (where 1/s went and alpha, or why the layer was not smoothed), carried by the JSON
bundle and shown in the HTML layer table only when SmoothQuant ran."""

from __future__ import annotations

import jsonschema
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.analysis.html.parts import layer_table_html
from workbench.analysis.report_json import report_schema, report_to_json
from workbench.engine.algorithms.smoothquant import SKIP_OTHER_PRODUCER

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _stack() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.LayerNorm(16),
        nn.Linear(16, 32),  # after the LayerNorm: folds into it
        nn.Linear(32, 24),  # after a Linear: folds into it
        nn.ReLU(),
        nn.Linear(24, 8),  # after a ReLU: skipped
    ).eval()
    with torch.no_grad():
        model[0].weight[[3, 7]] *= 40.0
    return model


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 5, 16, generator=generator) for _ in range(2)]


def _ptq(smoothquant):
    config = wb.QuantConfig(smoothquant=smoothquant)
    return wb.ptq(_stack(), _batches(), config=config, progress=False)


def test_smoothing_column_follows_the_plans_and_reaches_bundle_and_html():
    result = _ptq(0.5)
    plans = {plan.name: plan for plan in result.plans}
    column = result.report.layers.set_index("layer")["smoothing"]
    for name in ("1", "2"):
        expected = f"{plans[name].smoothing_fold} a={plans[name].smoothing_alpha:.2f}"
        assert column[name] == expected
    assert column["1"] == "layernorm a=0.50" and column["2"] == "linear a=0.50"
    assert column["4"] == SKIP_OTHER_PRODUCER
    bundle = report_to_json(result.report)
    jsonschema.Draft202012Validator(report_schema()).validate(bundle)
    assert {row["layer"]: row["smoothing"] for row in bundle["layers"]}["4"] == SKIP_OTHER_PRODUCER
    html = layer_table_html(bundle["layers"])
    assert 'data-column="smoothing"' in html and "layernorm a=0.50" in html


def test_without_smoothquant_the_column_is_empty_and_not_shown():
    result = _ptq(None)
    assert result.report.layers["smoothing"].isna().all()
    bundle = report_to_json(result.report)
    jsonschema.Draft202012Validator(report_schema()).validate(bundle)
    assert 'data-column="smoothing"' not in layer_table_html(bundle["layers"])
