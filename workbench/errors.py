"""The errors a user can cause, in one small hierarchy.

Every error names the fix in one sentence. They subclass ``ValueError`` / ``TypeError``
so code that already catches those keeps working.
"""

from __future__ import annotations

import re


class WorkbenchError(Exception):
    """Base class of every error the workbench raises on purpose.

    ``code`` names the kind of error for code that handles it: each class has its own, and
    an error may carry a finer one (``DistributedError``: ``distributed.timeout``, ...).
    Code reads the code; the message is for people.
    """

    code = "workbench"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # ConfigError -> "config", NonFiniteError -> "non_finite"
        if "code" in cls.__dict__:  # a class that names its own code
            return
        words = re.findall(r"[A-Z][a-z]*", cls.__name__.removesuffix("Error"))
        cls.code = "_".join(word.lower() for word in words)

    def __init__(self, *args: object, code: str | None = None) -> None:
        super().__init__(*args)
        if code is not None:
            self.code = code


class ConfigError(WorkbenchError, ValueError):
    """A scheme, preset, observer or option that does not exist or does not fit."""


class CalibrationError(WorkbenchError, ValueError):
    """Calibration data that is empty, malformed, or does not fit the model."""


class ModelError(WorkbenchError, TypeError):
    """A model the workbench cannot quantize (no supported layer, NaN weights, ...)."""


class NonFiniteError(WorkbenchError, ValueError):
    """A tensor holding NaN or Inf where a quantization range must be computed."""


class MetricError(WorkbenchError, ValueError):
    """An ``eval_fn`` that returns something other than one finite number."""


class ExportError(WorkbenchError, RuntimeError):
    """A model that could not be written as ONNX; the message names the op or module."""


class MissingDependencyError(WorkbenchError, ImportError):
    """An optional dependency that is not installed; the message gives the pip line."""


class DistributedError(WorkbenchError, RuntimeError):
    """A process of a distributed job stopped, or did not answer within the timeout."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what an
    error of ours quotes of an error it wraps."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
