"""Every error a user can catch lives in workbench/errors.py and is public."""

from __future__ import annotations

import inspect

import workbench as wb
from workbench import errors
from workbench.engine.training import distributed


def test_every_workbench_error_is_in_the_public_api():
    defined = {
        name
        for name, value in inspect.getmembers(errors, inspect.isclass)
        if issubclass(value, errors.WorkbenchError) and value.__module__ == errors.__name__
    }
    assert "DistributedError" in defined
    assert defined <= set(wb.__all__)
    for name in defined:
        assert getattr(wb, name) is getattr(errors, name)


def test_distributed_error_is_the_one_the_engine_raises():
    assert distributed.DistributedError is wb.DistributedError
    assert issubclass(wb.DistributedError, RuntimeError)
