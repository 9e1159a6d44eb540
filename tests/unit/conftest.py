"""Fixtures shared by the unit tests of the front ends."""

from __future__ import annotations

import pytest
from torch import nn


@pytest.fixture(scope="session")
def digits(digits_data):
    """sklearn's digits split (the session's one copy, see tests/conftest.py)."""
    return digits_data


@pytest.fixture
def shell(model, digits):
    """A fresh user namespace in the process-wide InteractiveShell, the extension loaded,
    and the names the magic tests refer to (``model`` is each test module's own fixture)."""
    from IPython.core.interactiveshell import InteractiveShell

    from workbench.demo import accuracy

    shell = InteractiveShell.instance()
    shell.reset(new_session=False)
    shell.run_line_magic("load_ext", "workbench")
    shell.user_ns.update(
        model=model,
        calib=digits.calib_batches(4, 32),
        train=[(digits.train_x[i : i + 32], digits.train_y[i : i + 32]) for i in range(0, 96, 32)],
        loss_fn=nn.CrossEntropyLoss(),
        accuracy=lambda m: accuracy(m, digits.test_x, digits.test_y),
        x=digits.test_x[:8],
        data=digits,
        not_a_model=[1, 2, 3],
        number=3,
    )
    return shell
