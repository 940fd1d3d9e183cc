"""Checks on the files a command will write, made before any compute so a bad path costs nothing."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["OutputPathError", "check_writable"]


class OutputPathError(ValueError):
    """An output file cannot be written where it was asked for; the message says why."""


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Raise :class:`OutputPathError` unless a file can be created at ``path``; return it as a Path.

    Outputs are written atomically (a temporary file beside ``path``, renamed into place) after creating
    missing parent folders, so what must hold is: ``path`` is not a folder, and the nearest existing
    ancestor is a folder that this process may write to. Checked with ``os.access``, which also sees a
    read-only file system (and, as the kernel does, lets root write to folders without write bits).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; name a file to write")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"cannot write {path}: directory {ancestor} is not writable (read-only or no permission); "
            "choose another path"
        )
    return path
