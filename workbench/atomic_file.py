"""Write files atomically: into a temporary file next to the target, then ``os.replace``.

A failed write leaves no partial file and no temporary behind, and an existing file at the
target stays as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def temporary_path_beside(target: Path, suffix: str) -> Iterator[Path]:
    """A fresh temporary file in ``target``'s folder, removed when the block ends."""
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(handle)
    path = Path(name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write; it replaces ``target`` only when the block succeeds."""
    with temporary_path_beside(target, suffix) as temporary:
        yield temporary
        os.replace(temporary, target)
