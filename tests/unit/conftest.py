"""Fixtures shared by the unit tests of the front ends."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits(digits_data):
    """sklearn's digits split (the session's one copy, see tests/conftest.py)."""
    return digits_data
