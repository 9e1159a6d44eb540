"""What surrounds every ONNX export the user asks for: the opset checked first, the folders
created for the file removed again when the export fails, the exporter's own printing (a
TorchScript IR dump of many kilobytes on an unsupported op) kept out of the notebook, and an
OS error (read-only folder, full disk) told as one ``ExportError`` naming the user's path.

Exports run one at a time in a process (``EXPORT_LOCK``): torch's exporter keeps global state
(``GLOBALS.in_onnx_export``) and the capture redirects the process's file descriptor 1, so two
threads exporting at once would break each other's export and could leave ``sys.stdout`` or
fd 1 pointing at a dead capture. The capture restores both whatever happens.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from numbers import Integral
from pathlib import Path

from workbench.atomic_file import missing_folders, remove_empty_folders
from workbench.errors import ConfigError, ExportError

# DequantizeLinear / QuantizeLinear with a per-channel ``axis`` (the INT8 weights) and
# per-channel zero points need opset 13.
MIN_OPSET = 13
# the TorchScript exporter (dynamo=False, the one that exports fake quantization) stops here
MAX_OPSET = 20
# the opset every export writes unless told otherwise
DEFAULT_OPSET = 17
EXPORT_LOCK = threading.RLock()


def check_opset(opset: object) -> None:
    if isinstance(opset, bool) or not isinstance(opset, Integral):
        raise ConfigError(
            f"opset must be an int from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}; "
            f"e.g. opset={DEFAULT_OPSET}"
        )
    if opset < MIN_OPSET:
        raise ConfigError(
            f"opset {opset} is below {MIN_OPSET}, the minimum the INT8 QDQ patterns need "
            f"(per-channel DequantizeLinear); pass opset={MIN_OPSET} or higher "
            f"(default {DEFAULT_OPSET})"
        )
    if opset > MAX_OPSET:
        raise ConfigError(
            f"opset {opset} is above {MAX_OPSET}, the highest torch's TorchScript exporter "
            f"writes; pass an opset from {MIN_OPSET} to {MAX_OPSET} (default 17)"
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
    created = missing_folders(target)
    log = io.StringIO()
    with EXPORT_LOCK:
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
            remove_empty_folders(created)
            raise


def _os_error(path: str | os.PathLike, exc: OSError) -> ExportError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return ExportError(
        f"cannot write the ONNX file {str(path)!r}: {reason}; pass a path in a folder you can "
        "write to, with free space"
    )


@contextlib.contextmanager
def _captured_output(log: io.StringIO) -> Iterator[None]:
    """Python's and the C++ exporter's stdout (file descriptor 1) go to ``log``; both are
    restored to what they were when the block ends, also when it raises (callers hold
    ``EXPORT_LOCK``: the redirection is process-wide)."""
    saved_stdout = sys.stdout
    with contextlib.suppress(ValueError, OSError, AttributeError):
        sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            saved = os.dup(1)
        except OSError:  # no file descriptor 1 (an embedded interpreter): Python's only
            saved = None
        try:
            if saved is not None:
                os.dup2(sink.fileno(), 1)
            sys.stdout = log
            yield
        finally:
            sys.stdout = saved_stdout
            if saved is not None:
                with contextlib.suppress(ValueError, OSError, AttributeError):
                    sys.__stdout__.flush()
                os.dup2(saved, 1)
                os.close(saved)
                sink.seek(0)
                log.write(sink.read().decode("utf-8", "replace"))
