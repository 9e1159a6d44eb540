"""The panel's Auto tab driven headless: wb.autotune with the tab's settings, the table and
the chart after every candidate, the best run adopted as the panel's result; its report's
JSON bundle (with the candidates table) follows the report schema."""

from __future__ import annotations

import jsonschema
import pytest
from digits_models import tiny_mlp

import workbench as wb
from workbench.analysis.report_json import REPORT_MIME_TYPE, report_schema
from workbench.demo import accuracy
from workbench.notebook.autotune_tab import TITLE
from workbench.notebook.display import STATUS_COLORS


@pytest.fixture(scope="module")
def model():
    return tiny_mlp()


def test_auto_tab_searches_shows_each_candidate_and_adopts_the_best(model, digits):
    calib = [x.flatten(1) for x in digits.calib_batches(4, 32)]
    test_x = digits.test_x.flatten(1)

    def test_accuracy(m):
        return accuracy(m, test_x, digits.test_y)

    app = wb.panel(model, calib, eval_fn=test_accuracy)
    assert app.tabs.titles[-1] == TITLE and app.tabs.children[-1] is app.auto.page
    app.auto.max_drop.value = 2.0
    app.auto.evaluations.value = 4  # FP32 and the three default presets
    app.auto.button.click()
    result = app.auto.result
    assert app.error == "" and result is not None and result.budget_met
    tried = result.table
    assert app.auto.updates >= len(tried)  # shown after every candidate
    for name in tried["candidate"]:
        assert name in app.auto.html.value
    assert bytes(app.auto.plot.value).lstrip().startswith(b"<?xml")
    # the best run is the panel's result: report tabs, runs table, export
    assert app.result is result.best
    assert test_accuracy(model) - test_accuracy(app.result.model) <= 2.0
    row = app.runs.frame.iloc[-1]
    assert row["method"] == "AUTO" and row["preset"] == result.best_row["candidate"]
    bundle = result.best.report._repr_mimebundle_()[REPORT_MIME_TYPE]
    jsonschema.validate(bundle, report_schema())
    assert bundle["tables"]["Autotune candidates"]["columns"][0] == "candidate"


def test_auto_tab_without_eval_fn_says_so_in_one_line(model, digits):
    app = wb.panel(model, [x.flatten(1) for x in digits.calib_batches(2, 32)])
    app.auto.button.click()
    assert app.auto.result is None
    assert "eval_fn" in app.error
    assert STATUS_COLORS["error"] in app.auto.status.value
