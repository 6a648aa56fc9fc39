"""The one atomic-write helper of the project: a file is either the old one or the whole new one, never half.

    with atomic_path(out) as tmp:      # a temporary name beside `out`
        write_somehow(tmp)             # on success: fsync tmp, rename over `out`, fsync the directory
    write_text_atomic(out, "text")

A crash leaves only a hidden `.NAME.tmp-PID` file, which no reader opens.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries (renames, creations), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it into place, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself survives a power loss
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
