"""Write files atomically: into a temporary file next to the target, then ``os.replace``.

A failed write leaves no partial file and no temporary behind (nor the folders created for
it), and an existing file at the target stays as it was. The written file gets the mode a
plain ``open()`` would give it (``0o666`` less the umask), not ``mkstemp``'s private 0600:
a serving process or a web server running as another user can read an exported model or a
report.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, without changing it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def missing_folders(target: Path) -> list[Path]:
    """The folders above ``target`` that do not exist yet, deepest first."""
    missing = []
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) where they are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


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
    """A temporary path to write; it replaces ``target`` only when the block succeeds, with the
    mode the umask gives new files. Missing folders above ``target`` are created, and removed
    again when the block fails."""
    target = Path(target)
    created = missing_folders(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with temporary_path_beside(target, suffix) as temporary:
            yield temporary
            os.chmod(temporary, 0o666 & ~current_umask())
            os.replace(temporary, target)
    except BaseException:
        remove_empty_folders(created)
        raise
