"""The committed tutorial notebooks carry no saved widget state and stay a size a reader can
diff (06 once held 6,200 lines of ipywidgets state)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
MAX_LINES = 1500
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
CLEAN = "python notebooks/clean_notebooks.py notebooks/*.ipynb"


def test_the_tutorials_are_there():
    assert len(NOTEBOOKS) >= 7


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_no_widget_state_is_committed(path: Path):
    text = path.read_text()
    notebook = json.loads(text)
    assert "widgets" not in notebook["metadata"], f"{path.name} carries widget state: run {CLEAN}"
    assert WIDGET_STATE not in text and WIDGET_VIEW not in text, f"run {CLEAN}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_stays_small(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines < MAX_LINES, f"{path.name} has {lines} lines (limit {MAX_LINES}): run {CLEAN}"
