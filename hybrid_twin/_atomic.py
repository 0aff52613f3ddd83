"""Atomic file writes: write to a temporary file beside the target, then rename.

The temporary file is `.<name>.<8 random characters>.tmp` in the target's folder; a
process killed mid-write leaves it behind (`remove_orphans` clears them).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file next to `path` for writing; on a clean exit it is flushed,
    synced and renamed over `path`, on an error (or interrupt) it is removed and `path`
    is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


_ORPHAN = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_open` left in `folder` (not its subfolders) when
    a writer was killed, and only those (`.<name>.<8 characters>.tmp`); return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if _ORPHAN.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink()
            removed.append(entry)
    return removed
