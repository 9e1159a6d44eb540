"""The report as JSON, for the JupyterLab renderer (MIME ``application/vnd.workbench.report+json``).

The schema is ``report_schema.json`` next to this file (JSON Schema, draft 2020-12).
Numbers that are not finite (an exact layer's infinite SQNR, a kept-FP32 layer's missing
values) become ``null``; every string is plain text that a renderer must show as text.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from typing import Any

import pandas as pd

from workbench.analysis.missing_values import is_missing
from workbench.analysis.storage import STORAGE_COLUMNS

REPORT_MIME_TYPE = "application/vnd.workbench.report+json"
SCHEMA_VERSION = 1


def json_value(value: Any) -> Any:
    """A JSON-safe copy of one cell: NaN/Inf/NA -> None, numpy scalars -> Python numbers."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None if is_missing(value) else str(value)


def _records(table: pd.DataFrame, fields: list[str]) -> list[dict[str, Any]]:
    present = [f for f in fields if f in table.columns]
    return [
        {field: json_value(row[field]) for field in present} for _, row in table[present].iterrows()
    ]


def report_to_json(report) -> dict[str, Any]:
    """The JSON bundle of a Report (see ``report_schema.json``)."""
    tables = {
        str(title): {
            "columns": [str(c) for c in table.columns],
            "rows": [[json_value(v) for v in row] for row in table.itertuples(index=False)],
        }
        for title, table in report.extra_tables.items()
    }
    layers = _records(report.layers, _schema_fields("layers"))
    folded_into = {row["layer"]: row.get("folded_into") for row in layers}
    return {
        "schema_version": SCHEMA_VERSION,
        "summary": json_value(dict(report.summary)),
        "layers": in_model_order(layers, folded_into),
        "storage": in_model_order(_records(report.storage, STORAGE_COLUMNS), folded_into),
        "tables": tables,
    }


def in_model_order(
    rows: list[dict[str, Any]], folded_into: dict[str, str | None]
) -> list[dict[str, Any]]:
    """``rows`` with each folded layer (a BatchNorm) right after the layer it was folded
    into, where the report lists them at the end; the other rows keep their order."""
    folded: dict[str, list[dict[str, Any]]] = {}
    present = {row["layer"] for row in rows}
    for row in rows:
        target = folded_into.get(row["layer"])
        if target and target in present:
            folded.setdefault(target, []).append(row)
    moved = {id(row) for group in folded.values() for row in group}
    ordered = []
    for row in rows:
        if id(row) in moved:
            continue
        ordered.append(row)
        ordered.extend(folded.get(row["layer"], ()))
    return ordered


def report_schema() -> dict[str, Any]:
    """The JSON Schema the bundle follows."""
    text = resources.files("workbench.analysis").joinpath("report_schema.json").read_text()
    return json.loads(text)


@cache
def _schema_fields(table: str) -> list[str]:
    """The columns of ``report.<table>`` the bundle carries: the schema's properties."""
    return list(report_schema()["properties"][table]["items"]["properties"])
