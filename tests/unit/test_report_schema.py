"""The rich display of a result: the JSON bundle validates against its documented schema,
and layer names are shown as text, never as markup (a layer named ``<img ...>``)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from IPython.core.interactiveshell import InteractiveShell
from torch import nn

import workbench as wb
from workbench.analysis.report_json import REPORT_MIME_TYPE, report_schema

EVIL = "<img src=x onerror=alert(1)>"


class EvilNames(nn.Module):
    """A model whose first layer's name is markup, plus a conv, a BN to fold and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4)
        self.add_module(EVIL, nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(torch.relu(getattr(self, EVIL)(x)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EvilNames().eval()


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(1)
    return [torch.randn(16, 2, 8) for _ in range(3)]


@pytest.fixture(scope="module")
def validator():
    schema = report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def displayed(result) -> dict:
    """What IPython's display machinery sends to the front end for ``result``."""
    data, _ = InteractiveShell.instance().display_formatter.format(result)
    return data


CONFIGS = {
    "int8": wb.QuantConfig.preset("int8"),
    "w4a4-percentile": wb.QuantConfig.preset("w4a4", observer="percentile"),
    "weight-only-excluded": wb.QuantConfig.preset("int8-weight-only", exclude=("head",)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bundle_validates_against_schema(model, calib, validator, name):
    result = wb.ptq(model, calib, config=CONFIGS[name], eval_fn=lambda m: 1.0, progress=False)
    data = displayed(result)
    assert set(data) >= {"text/plain", "text/html", REPORT_MIME_TYPE}
    bundle = data[REPORT_MIME_TYPE]
    errors = sorted(validator.iter_errors(bundle), key=str)
    assert errors == [], errors[0].message if errors else ""
    json.dumps(bundle, allow_nan=False)  # strict JSON: no NaN / Infinity
    layers = {row["layer"]: row for row in bundle["layers"]}
    assert set(layers) == set(result.report.layers["layer"])
    assert layers["bn"]["status"] == "fp32"
    assert layers["conv"]["status"] == "quantized"


def test_layer_named_markup_is_text_in_json_and_escaped_in_html(model, calib, validator):
    result = wb.ptq(model, calib, progress=False)
    data = displayed(result)
    bundle = data[REPORT_MIME_TYPE]
    validator.validate(bundle)
    assert EVIL in [row["layer"] for row in bundle["layers"]]
    assert EVIL in [row["layer"] for row in bundle["storage"]]
    page = data["text/html"]
    assert "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_qat_report_validates(model, calib, validator):
    train = [(x, torch.randint(0, 3, (x.shape[0],))) for x in calib]
    result = wb.qat(model, train, loss_fn=nn.CrossEntropyLoss(), epochs=1, lr=1e-3, progress=False)
    bundle = displayed(result)[REPORT_MIME_TYPE]
    validator.validate(bundle)
    assert "Training (per epoch)" in bundle["tables"]


def test_schema_rejects_malformed_bundles(model, calib, validator):
    bundle = wb.ptq(model, calib, progress=False).report.to_json()
    broken_status = json.loads(json.dumps(bundle))
    broken_status["layers"][0]["status"] = "half-quantized"
    missing_storage = {k: v for k, v in bundle.items() if k != "storage"}
    fractional_bytes = json.loads(json.dumps(bundle))
    fractional_bytes["storage"][0]["total_bytes"] = 1.5
    for broken in (broken_status, missing_storage, fractional_bytes):
        assert not validator.is_valid(broken)
