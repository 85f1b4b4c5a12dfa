"""The cache folder and what fills it: where it is (``$MINITURING_CACHE``, else
``~/.cache/minituring``), the prepared entries in it (:class:`CacheDir`), and the worker
processes that prepare them.

An entry is built by one process at a time: the first process to need it holds the entry's
lock (``flock`` on ``NAME.lock`` beside it) while it builds; the others wait, naming the holder,
then use the finished entry. It is built under a temporary name and renamed into place once
complete, with :data:`DONE` recording each file's size and checksum; a reader checks both before
it trusts the entry (:func:`file_record`), and a damaged entry is rebuilt. A folder without its
marker (a crash, ``kill -9``) is rebuilt; temporary folders of dead processes are removed. Long
preparations write shards into a ``.partial`` folder, each shard atomically
(:func:`model.files.atomic_path`), so an interrupted one resumes from the shards already written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from model.files import atomic_write_text

log = logging.getLogger(__name__)

DONE = "done.json"
# Bumped whenever what a prepared folder holds changes for the same inputs.
PREP_VERSION = 1


class CacheError(OSError):
    """A cache entry that cannot be trusted and cannot be rebuilt here."""


def cache_root() -> Path:
    """The cache folder: ``$MINITURING_CACHE``, else ``~/.cache/minituring``."""
    return Path(os.environ.get("MINITURING_CACHE", Path.home() / ".cache" / "minituring"))


def prepared_root() -> Path:
    """Where prepared data (tables, token files, trained tokenizers) is kept."""
    return cache_root() / "prepared"


# ---------------------------------------------------------------------------- checksums

# blake2b (hashlib) reads about 1 GB/s on one core (0.09 s for a 100 MB token file, see
# docs/training.md): files up to WHOLE_HASH_BYTES are hashed whole, at most ~70 ms each; larger
# ones by SAMPLE_BLOCKS blocks of SAMPLE_BYTES spread evenly over the file, first and last
# included (16 MiB, ~20 ms whatever the size). Sizes are always checked in full.
WHOLE_HASH_BYTES = 64 << 20
SAMPLE_BLOCKS, SAMPLE_BYTES = 256, 64 << 10


def file_checksum(path: Path, size: int) -> str:
    """blake2b of the file (``size`` bytes): the whole file, or its sampled blocks when larger
    than :data:`WHOLE_HASH_BYTES`."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= WHOLE_HASH_BYTES:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        else:
            last = size - SAMPLE_BYTES
            for i in range(SAMPLE_BLOCKS):
                h.update(os.pread(f.fileno(), SAMPLE_BYTES, last * i // (SAMPLE_BLOCKS - 1)))
    return h.hexdigest()


def _checksum_kind(size: int) -> str:
    return "blake2b" if size <= WHOLE_HASH_BYTES else "blake2b_sampled"


def file_record(path: Path) -> dict:
    """What :data:`DONE` records of one file: its size and checksum."""
    size = path.stat().st_size
    return {"size": size, _checksum_kind(size): file_checksum(path, size)}


def file_problem(path: Path, record: dict) -> str | None:
    """How ``path`` differs from its ``record`` (the file, what was expected, what was found),
    or None when it matches."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path.name}: expected {record['size']:,} bytes, found no file"
    if size != record["size"]:
        return f"{path.name}: expected {record['size']:,} bytes, found {size:,}"
    kind = _checksum_kind(size)
    found = file_checksum(path, size)
    if found != record.get(kind):
        return f"{path.name}: expected {kind} {record.get(kind)}, found {found}"
    return None


# ---------------------------------------------------------------------------- entry locks

# flock on a filesystem without locks (some network filesystems): build unlocked, with a warning.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", -1)}
_held: set[int] = set()  # descriptors of the entry locks this process holds


def _close_in_child() -> None:
    """A forked child (a preparation worker) closes its copies of the locks, so a lock goes
    when the process that took it dies, even if a child lingers."""
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _holder(lock: Path) -> str:
    try:
        pid, _, host = lock.read_text().strip().partition(" ")
    except OSError:
        pid = host = ""
    return f"process {pid}" + (f" on {host}" if host else "") if pid else "another process"


def _lock_fd(lock: Path, entry: Path) -> int:
    """``lock`` opened and flocked, waiting (with a message naming the holder) while another
    process holds it. The holder removes the file as it lets go, so a waiter that then finds
    its descriptor no longer names ``lock`` opens it again."""
    waited = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    log.warning(
                        "waiting for %s, which is building the cache entry %s (it holds %s)",
                        _holder(lock),
                        entry,
                        lock,
                    )
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    return fd
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            log.warning("cannot lock %s (%s): building %s unlocked", lock, err.strerror, entry)
            return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextmanager
def entry_lock(lock: Path, entry: Path) -> Iterator[None]:
    """Hold ``lock`` (a file beside ``entry``) for the body: one builder per entry."""
    fd = _lock_fd(lock, entry)
    _held.add(fd)
    try:
        # Locked: say who holds it. Written after locking, so a waiter never erases the name.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        _held.discard(fd)
        with contextlib.suppress(OSError):
            lock.unlink()  # before unlocking: see _lock_fd
        os.close(fd)


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
    """One prepared entry, ``root/name``, complete only when it holds :data:`DONE` and every
    file it records matches its size and checksum. :meth:`obtain` is the way in."""

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = Path(root), name
        self.path = self.root / name
        self.partial = self.root / f"{name}.partial"
        self.lock = self.root / f"{name}.lock"
        self._done: dict | None = None
        self.built = False  # whether obtain() built the entry in this process

    def problem(self) -> str | None:
        """Why the entry cannot be used as it is, or None when it verifies."""
        self._done = None
        try:
            done = json.loads((self.path / DONE).read_text())
        except FileNotFoundError:
            return "missing" if not self.path.exists() else f"incomplete: no {DONE}"
        except (OSError, ValueError) as err:
            return f"{DONE}: unreadable ({err})"
        if not isinstance(done, dict) or not isinstance(done.get("files"), dict):
            return f"{DONE}: records no files (written by an older version)"
        if not isinstance(done.get("meta"), dict):
            return f"{DONE}: records no metadata"
        try:
            for name, record in sorted(done["files"].items()):
                problem = file_problem(self.path / name, record)
                if problem is not None:
                    return problem
        except (OSError, TypeError, KeyError) as err:  # removed while read, a damaged record
            return f"{DONE}: cannot be checked ({err!r})"
        self._done = done
        return None

    def obtain(self, fill: Callable[[], object]) -> dict:
        """The entry's metadata, once it verifies. A missing or damaged entry is first built by
        ``fill()`` (which writes it through :meth:`build`), by one process at a time: the first
        holds the entry's lock while it builds, the others wait, then find the entry built."""
        if self.problem() is None:
            return self._done["meta"]
        self.root.mkdir(parents=True, exist_ok=True)
        with entry_lock(self.lock, self.path):
            problem = self.problem()
            if problem is not None:
                self._discard(problem)
                fill()
                self.built = True
                problem = self.problem()
                if problem is not None:
                    raise CacheError(
                        f"the cache entry {self.path} does not verify right after it was built "
                        f"({problem}); delete {self.path} and run again"
                    )
        return self._done["meta"]

    def _discard(self, problem: str) -> None:
        if not self.path.exists():
            return
        log.warning("rebuilding the cache entry %s: %s", self.path, problem)
        try:
            shutil.rmtree(self.path)
        except OSError as err:
            raise CacheError(
                f"the cache entry {self.path} is damaged ({problem}) and cannot be removed "
                f"({err.strerror or err}); delete {self.path} and run again"
            ) from None

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
        """A temporary folder to fill; on success :data:`DONE` records its files (and
        ``meta``, which the body may still fill) and it becomes ``path``."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        tmp = self.root / f"{self.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            info = {} if meta is None else meta
            yield tmp
            files = {p.name: file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            atomic_write_text(tmp / DONE, json.dumps({"files": files, "meta": info}))
            try:
                os.rename(tmp, self.path)
            except OSError:
                # Another process completed the same folder first (a filesystem without
                # locks): keep its copy.
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
