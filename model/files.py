"""Writing run-folder files atomically: a reader (``model.load``, another process) finds the
old file or the new one, never half of one, and a crash leaves no partial file in its place."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, unique: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for the body to write; when the body returns, the file
    is flushed to disk and renamed over ``path``. If the body fails, the file is removed.
    ``unique``: the temporary name carries the process id and a random part, for a file that
    several processes may write at once (a shared cache)."""
    path = Path(path)
    suffix = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}" if unique else ".tmp"
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it), where the platform allows."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
