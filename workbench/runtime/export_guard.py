"""What surrounds every ONNX export the user asks for: the opset checked first, the folders
created for the file removed again when the export fails, the exporter's own printing (a
TorchScript IR dump of many kilobytes on an unsupported op) kept out of the notebook, and an
OS error (read-only folder, full disk) told as one ``ExportError`` naming the user's path.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from numbers import Integral
from pathlib import Path

from workbench.errors import ConfigError, ExportError

# DequantizeLinear / QuantizeLinear with a per-channel ``axis`` (the INT8 weights) and
# per-channel zero points need opset 13.
MIN_OPSET = 13


def check_opset(opset: object) -> None:
    if isinstance(opset, bool) or not isinstance(opset, Integral):
        raise ConfigError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}; e.g. opset=17")
    if opset < MIN_OPSET:
        raise ConfigError(
            f"opset {opset} is below {MIN_OPSET}, the minimum the INT8 QDQ patterns need "
            f"(per-channel DequantizeLinear); pass opset={MIN_OPSET} or higher (default 17)"
        )


@contextlib.contextmanager
def guarded_export(path: str | os.PathLike, opset: object) -> Iterator[io.StringIO]:
    """Check ``opset``, create ``path``'s folder, run the body with its output captured
    (yielded as text); on failure remove the folders made here and turn OS errors into
    ``ExportError``. The captured text is attached to the error as ``exporter_log``."""
    check_opset(opset)
    if not isinstance(path, str | os.PathLike):
        raise ConfigError(f"path must be a file path such as 'model.onnx', got {path!r}")
    target = Path(path)
    created = _missing_parents(target)
    log = io.StringIO()
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _captured_output(log):
                yield log
        except OSError as exc:
            raise _os_error(path, exc) from exc
        except ExportError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError):
                raise _os_error(path, cause) from cause
            raise
    except BaseException as exc:
        exc.exporter_log = log.getvalue()
        _remove_empty(created)
        raise


def _os_error(path: str | os.PathLike, exc: OSError) -> ExportError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return ExportError(
        f"cannot write the ONNX file {str(path)!r}: {reason}; pass a path in a folder you can "
        "write to, with free space"
    )


def _missing_parents(target: Path) -> list[Path]:
    """The folders above ``target`` that do not exist yet, deepest first."""
    missing = []
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def _captured_output(log: io.StringIO) -> Iterator[None]:
    """Python's and the C++ exporter's stdout (file descriptor 1) go to ``log``."""
    sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            saved = os.dup(1)
        except OSError:  # no file descriptor 1 (an embedded interpreter): Python's only
            with contextlib.redirect_stdout(log):
                yield
            return
        try:
            os.dup2(sink.fileno(), 1)
            with contextlib.redirect_stdout(log):
                yield
        finally:
            with contextlib.suppress(ValueError, OSError):
                sys.__stdout__.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            log.write(sink.read().decode("utf-8", "replace"))
