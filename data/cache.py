"""The cache folder and what fills it: where it is (``$MINITURING_CACHE``, else
``~/.cache/minituring``), the prepared folders in it, each built under a temporary name and
renamed into place once complete (:class:`CacheDir`), and the worker processes that prepare
them.

A folder without its completion marker (a crash, ``kill -9``) is removed and rebuilt;
temporary folders of dead processes are removed. Long preparations write shards into a
``.partial`` folder, each shard atomically (:func:`model.files.atomic_path`), so an interrupted
one resumes from the shards already written.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from model.files import atomic_write_text

log = logging.getLogger(__name__)

DONE = "done.json"
# Bumped whenever what a prepared folder holds changes for the same inputs.
PREP_VERSION = 1


def cache_root() -> Path:
    """The cache folder: ``$MINITURING_CACHE``, else ``~/.cache/minituring``."""
    return Path(os.environ.get("MINITURING_CACHE", Path.home() / ".cache" / "minituring"))


def prepared_root() -> Path:
    """Where prepared data (tables, token files, trained tokenizers) is kept."""
    return cache_root() / "prepared"


# ---------------------------------------------------------------------------- prepared folders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheDir:
    """One prepared folder, ``root/name``, complete only when it holds :data:`DONE`."""

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = Path(root), name
        self.path = self.root / name
        self.partial = self.root / f"{name}.partial"

    def ready(self) -> bool:
        if (self.path / DONE).is_file():
            return True
        if self.path.exists():
            log.warning("rebuilding the incomplete cache %s (no %s)", self.path, DONE)
            shutil.rmtree(self.path, ignore_errors=True)
        return False

    def meta(self) -> dict:
        return json.loads((self.path / DONE).read_text())

    def _remove_stale(self) -> None:
        for tmp in self.root.glob(f"{self.name}.tmp-*"):
            try:
                pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
            except ValueError:
                pid = -1
            if pid < 0 or not _pid_alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)

    @contextmanager
    def build(self, meta: dict | None = None) -> Iterator[Path]:
        """A temporary folder to fill; on success it gains the marker and becomes ``path``."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        tmp = self.root / f"{self.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            info = {} if meta is None else meta
            yield tmp
            atomic_write_text(tmp / DONE, json.dumps(info))
            try:
                os.rename(tmp, self.path)
            except OSError:
                # Another process completed the same folder first: keep its copy.
                if not (self.path / DONE).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(self.partial, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ---------------------------------------------------------------------------- worker processes


def worker_count() -> int:
    """Worker processes for a preparation: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        cpus = os.cpu_count() or 1
    return min(cpus, 8)


def mp_context() -> multiprocessing.context.BaseContext:
    """fork on Linux: it starts workers instantly and does not re-import the caller's main
    module; elsewhere the platform's default (spawn), the safe choice."""
    if sys.platform == "linux":
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()
