"""An exclusive lock on a run folder for the life of a training process.

Two trainers writing into one run folder interleave their checkpoints and metrics and leave a
folder that belongs to neither. ``RunLock`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
``RUN/.lock`` and writes the holder's pid and host into it, so a refused process can say who
holds the folder. The kernel drops the lock when the holder's file is closed or the process
dies (kill -9 included): a lock file left behind is never stale, it is simply taken again.

Readers (``model.load``, ``minituring``) never lock: the trainer publishes config,
weights and checkpoints by atomic renames, so a reader always sees a whole file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from trainer.errors import TrainingError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

# flock on a filesystem that has no locks (some network filesystems): carry on, with a warning.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", -1)}
_warned = False


_held: set[RunLock] = set()  # locks this process holds


def _forget_in_child() -> None:
    """A forked child (a corpus-building worker, say) drops its copy of the lock: the lock
    belongs to the trainer, and must go when the trainer dies, even if the child lingers."""
    for lock in list(_held):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class RunFolderLocked(TrainingError):
    """Another process holds the run folder's lock."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    pid, _, host = text.partition(" ")
    if not pid:
        return "another process"
    return f"process {pid}" + (f" on {host}" if host else "")


class RunLock:
    """``with RunLock(folder): ...`` or ``acquire()`` / ``release()``.

    Raises ``RunFolderLocked`` (naming the folder and the holder's pid) when another process
    holds the folder. The folder must exist.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        global _warned
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderLocked(
                f"run folder {self.folder} is in use by {_holder(self.path)}, which holds "
                f"{self.path}; wait for it to finish or stop it first"
            ) from None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            if not _warned:
                log.warning(
                    "cannot lock %s (%s): this filesystem has no file locks; nothing stops "
                    "a second trainer from writing into %s",
                    self.path,
                    os.strerror(err.errno),
                    self.folder,
                )
                _warned = True
        # Locked (or unlockable): say who holds it. Truncate after locking, never before, so
        # a refused process never erases the holder's name.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        _held.add(self)
        return self

    def release(self) -> None:
        """Unlock. The file stays: removing it would race a process about to lock it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _held.discard(self)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def hold_run_folder(
    folder: str | os.PathLike, *, main: bool, distributed: bool
) -> contextlib.AbstractContextManager:
    """Take the run folder's lock for a training job; every rank calls this.

    Rank 0 (``main``) takes the lock; under ``torch.distributed`` it then tells the other ranks
    whether it got it, so that on a refusal every rank raises the same ``RunFolderLocked``
    rather than waiting for a rank 0 that has gone. Returns the lock, to be released (or used
    as a context manager) when training ends; on ranks other than 0 it is an unheld lock.
    """
    lock = RunLock(folder)
    refusal = None
    if main:
        try:
            lock.acquire()
        except RunFolderLocked as err:
            refusal = str(err)
        except OSError as err:  # e.g. the folder went away: every rank stops alike
            refusal = f"cannot lock {lock.path}: {err.strerror or err}"
    if distributed:
        import torch.distributed

        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise RunFolderLocked(refusal)
    return lock if main else contextlib.nullcontext()
