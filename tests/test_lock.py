"""The run folder's lock: one trainer writes into a folder at a time, a second one (fresh or
``--resume``) stops before any work and names the process holding it; kill -9 leaves no stale
lock; readers never lock and always load a whole folder while a run writes into it."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, metrics
from test_faults import wait_for

import model as api
from trainer import lock as lock_module
from trainer.lock import RunFolderLocked, RunLock

needs_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)

HOLD = (
    "import sys; from trainer.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
    "print('held', flush=True); sys.stdin.read()"
)


def flags(out: Path, corpus_files, *extra: str) -> list[str]:
    text, pairs = corpus_files
    return TINY_FLAGS + [
        "--train-text", str(text), "--train-pairs", str(pairs), "--output-dir", str(out),
        "--max-steps", "12", "--save-every", "4", "--log-every", "2", *extra,
    ]  # fmt: skip


def child_env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def train_py(*argv: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *launcher, "train.py", *argv],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


class Holder:
    """Another process holding ``folder``'s lock until ``release()`` (or ``kill()``)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(folder)],
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def release(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------- the lock itself


def test_a_second_lock_is_refused_and_names_the_holder(tmp_path):
    with RunLock(tmp_path) as first:
        assert first.held
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(RunFolderLocked) as refused:
            RunLock(tmp_path).acquire()
        assert str(tmp_path) in str(refused.value)
        assert f"process {os.getpid()}" in str(refused.value)
        # The refusal leaves the holder's name in place.
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    assert not first.held
    # Released: the file left behind is no obstacle.
    assert (tmp_path / ".lock").exists()
    RunLock(tmp_path).acquire().release()


def test_a_forked_child_outliving_the_holder_keeps_no_lock(tmp_path):
    """The trainer forks workers (the corpus pool) while it holds the lock: killed, it must
    leave the folder free even while such a child lives on."""
    script = (
        "import os, signal, sys, time; from trainer.lock import RunLock; "
        "RunLock(sys.argv[1]).acquire(); pid = os.fork()\n"
        "if pid == 0:\n    null = os.open(os.devnull, os.O_RDWR); os.dup2(null, 1); "
        "os.dup2(null, 2); time.sleep(60); os._exit(0)\n"
        "print(pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    holder = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert holder.returncode == -signal.SIGKILL, holder.stderr
    child = int(holder.stdout.split()[0])
    try:
        os.kill(child, 0)  # still alive
        RunLock(tmp_path).acquire().release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_without_file_locks_a_warning_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(lock_module, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="trainer.lock"):
        with RunLock(tmp_path) as a:
            assert a.held
        with RunLock(tmp_path):
            pass
    warnings = [r for r in caplog.records if "no file locks" in r.getMessage()]
    assert len(warnings) == 1


def test_other_lock_errors_are_not_swallowed(tmp_path, monkeypatch):
    def broken(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output"):
        RunLock(tmp_path).acquire()


# ---------------------------------------------------------------------------- trainers


def test_refused_before_data_preparation(tmp_path, corpus_files):
    """The lock is taken before the data is read: with a holder and a missing data file, the
    error is the lock's, and nothing but the lock file is in the folder."""
    out = tmp_path / "run"
    holder = Holder(out)
    try:
        argv = flags(out, corpus_files, "--train-text", str(tmp_path / "missing.txt"))
        done = train_py(*argv)
    finally:
        holder.release()
    assert done.returncode != 0
    line = error_line(done)
    assert str(out) in line and f"process {holder.pid}" in line, line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_second_trainer_refused_while_the_first_trains_then_kill_frees_it(tmp_path, corpus_files):
    """The first trainer is frozen inside its second save (so the folder stands still); a
    fresh and a resuming trainer on the same folder are refused and change nothing. Once the
    first is killed with SIGKILL, its lock is gone and --resume finishes the run."""
    out, ready = tmp_path / "run", tmp_path / "frozen"
    env = child_env(MINITURING_FAULT="pointer:2", MINITURING_FAULT_READY=str(ready))
    with open(tmp_path / "log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "bench.faults", *flags(out, corpus_files)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(ready.exists, lambda: first.poll() is None, what="the first trainer's save")
        before, lines = snapshot(out), len(metrics(out))
        for argv in (flags(out, corpus_files), ["--resume", str(out)]):
            done = train_py(*argv)
            assert done.returncode != 0, done.stdout[-2000:]
            line = error_line(done)
            assert str(out) in line and f"process {first.pid}" in line, line
            assert snapshot(out) == before
        assert len(metrics(out)) == lines
    finally:
        first.kill()
        first.wait(30)
    assert first.returncode == -signal.SIGKILL
    done = train_py("--resume", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(out)[-1]["step"] == 12
    steps = [m["step"] for m in metrics(out) if "lr" in m]
    assert steps == sorted(set(steps))  # one history, never two writers' lines interleaved


@needs_gloo
def test_every_rank_of_a_torchrun_job_stops_with_the_refusal(tmp_path, corpus_files):
    out = tmp_path / "run"
    holder = Holder(out)
    try:
        launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
        start = time.monotonic()
        done = train_py(*flags(out, corpus_files), launcher=launcher)
    finally:
        holder.release()
    assert done.returncode != 0
    assert time.monotonic() - start < 120  # no rank left waiting for the others
    # Counted in the whole stream: two ranks writing at once can share a line.
    message = f"error: run folder {out} is in use by process {holder.pid}"
    assert done.stderr.count(message) == 2, done.stderr[-3000:]  # one from each rank
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# ---------------------------------------------------------------------------- readers


def test_readers_never_lock_and_load_a_whole_folder_while_a_run_writes(tmp_path, corpus_files):
    """``model.load`` in a loop while a trainer saves every step: every load succeeds, with the
    config's shapes, and the lock is never touched by the reader."""
    out = tmp_path / "run"
    argv = flags(out, corpus_files, "--max-steps", "400", "--save-every", "1", "--log-every", "1")
    env = child_env(MINITURING_SLOW_STEPS="0.02")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "bench.faults", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: (out / "model.safetensors").exists(),
            lambda: trainer.poll() is None,
            what="the first save",
        )
        loads, deadline = 0, time.monotonic() + 4
        while time.monotonic() < deadline and trainer.poll() is None:
            lm = api.load(out)
            hidden = lm.config.hidden_size
            assert lm.model.get_input_embeddings().weight.shape[1] == hidden
            loads += 1
        assert trainer.poll() is None, "the trainer ended before the readers were done"
        # The trainer still holds its lock: the readers never took or broke it.
        with pytest.raises(RunFolderLocked):
            RunLock(out).acquire()
    finally:
        trainer.kill()
        trainer.wait(30)
    assert loads >= 3
