"""Fixtures of the browser tests (helpers in browser_support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_support import LabServer, running_lab_server


@pytest.fixture
def lab_server(tmp_path: Path) -> Iterator[LabServer]:
    """JupyterLab on 127.0.0.1 at a free port, with a token, rooted in a fresh folder."""
    with running_lab_server(tmp_path) as server:
        yield server
