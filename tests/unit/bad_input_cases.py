"""What the bad-input sweeps share: a registry of cases and the check each case runs.

A case is a function ``case_<name>(tmp) -> (model, data, call)`` registered with the error it
expects (``SUCCEEDS`` for an input that must work, or a warning class). ``check_case`` runs it
in a fresh working folder and temporary folder: the call raises the expected error, in one
line, matching the pattern (or warns, or succeeds); the model and data are left as they were;
no file is left behind but those the case says it writes; no temporary file stays.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from model_guard import untouched

import workbench as wb

SUCCEEDS = None


@dataclass
class Case:
    build: Callable[[Path], tuple[Any, Any, Callable[[], Any]]]
    expected: type | None
    match: str = ""
    writes: tuple[str, ...] = ()  # files (and folders) a succeeding case leaves in the folder


class Cases(dict[str, Case]):
    """The cases of one sweep, by name."""

    def case(self, expected: type | None, match: str = "", writes: tuple[str, ...] = ()):
        """Register ``case_<name>(tmp) -> (model, data, call)``."""

        def register(build):
            self[build.__name__.removeprefix("case_")] = Case(build, expected, match, writes)
            return build

        return register


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def check_case(
    spec: Case,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    errors: tuple[type[Exception], ...] = (wb.WorkbenchError,),
) -> None:
    """Run one case as the module docstring says; ``errors``: what a raised error must be."""
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    model, data, call = spec.build(work)
    before = listing(work)
    with untouched(model, data):
        if spec.expected is SUCCEEDS:
            call()
        elif issubclass(spec.expected, Warning):
            with pytest.warns(spec.expected, match=spec.match):
                call()
        else:
            with pytest.raises(spec.expected, match=spec.match) as info:
                call()
            assert isinstance(info.value, errors)
            assert "\n" not in str(info.value), str(info.value)
    assert listing(work) == before | set(spec.writes), "files left behind or missing"
    # torch's own compile cache may appear there; the workbench's files may not
    left = [n for n in os.listdir(scratch) if not n.startswith("torchinductor_")]
    assert left == [], "temporary files left behind"
