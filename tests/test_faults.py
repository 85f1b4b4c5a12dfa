"""Faults a long run meets: kill -9 at any moment (inside a checkpoint save included),
SIGTERM / SIGINT, non-finite losses, gradients and weights, a full disk or an unwritable
folder, checkpoint retention, and run folders that are malicious or inconsistent.

Kill tests run real training processes: a forked copy of this test process (cheap: nothing to
import again) or, once, the command line itself. ``bench.faults`` freezes a process at an exact
moment of a save so that SIGKILL lands there.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, latest_step, metrics, train_flags
from fault_runner import assert_same_run
from safetensors.torch import load_file, save_file

import model as api
import train
from bench.faults import freeze, slow_down
from data.batching import MixtureLoader
from model.api import RunFolderError
from model.transformer import MiniTuringModel
from trainer import checkpoint, prepare

STEPS, SAVE_EVERY, KEEP = 12, 4, 2

needs_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


pytestmark = pytest.mark.usefixtures("without_plot")


def flags(out: Path, corpus_files, *extra: str) -> list[str]:
    return train_flags(
        out, corpus_files, "--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY),
        "--keep-checkpoints", str(KEEP), "--log-every", "2", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_files) -> Path:
    """The uninterrupted run every faulty one must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train.train(train.config_from_args(flags(out, corpus_files)))
    return out


def resume(out: Path, *extra: str) -> None:
    train.train(train.config_from_args(["--resume", str(out), *extra]))


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name)


def assert_loadable_checkpoint(out: Path) -> int:
    """The checkpoint ``--resume`` would take is whole: every file in it loads. Returns its step."""
    path = checkpoint.Checkpointer(out, KEEP).latest()
    assert path is not None, "no complete checkpoint"
    load_file(str(path / "model.safetensors"))
    torch.load(path / "optimizer.pt", weights_only=True)
    torch.load(path / "rng.pt", weights_only=True)
    return json.loads((path / "state.json").read_text())["step"]


# ---------------------------------------------------------------------------- kill -9


def _child(argv: list[str], point: str | None, n: int, ready: str, slow: float, log: str):
    with open(log, "w", buffering=1) as out:
        sys.stdout = sys.stderr = out
        torch.set_num_threads(1)
        if point:
            freeze(point, n, Path(ready))
        if slow:
            slow_down(slow)
        train.main(argv)


@contextlib.contextmanager
def training_process(argv, tmp_path, point=None, n=1, slow=0.0):
    """A forked training process (and the file its freeze is announced in), never left behind."""
    ready = tmp_path / "frozen"
    ctx = multiprocessing.get_context("fork")
    args = (argv, point, n, str(ready), slow, str(tmp_path / "child.log"))
    proc = ctx.Process(target=_child, args=args, daemon=True)
    proc.start()
    try:
        yield proc, ready
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(30)


def wait_for(condition, alive, timeout: float = 180.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive(), f"the training process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def sigkill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL


# (freeze point, its n-th arrival, the checkpoint --resume must take afterwards)
KILL_POINTS = [
    ("weights", 2, 4),  # inside step 8's model.safetensors
    ("optimizer", 2, 4),  # inside step 8's optimizer.pt
    ("rename", 2, 4),  # step 8 complete under its temporary name
    ("pointer", 2, 4),  # step 8 renamed, `latest` still names step 4
    ("pointer", 1, 4),  # step 4 renamed, no `latest` written yet at all
    ("export", 2, 8),  # step 8 complete, the run folder's model.safetensors half written
]


@pytest.mark.parametrize("point, n, expected", KILL_POINTS)
def test_kill_9_inside_a_checkpoint_save(tmp_path, corpus_files, reference, point, n, expected):
    out = tmp_path / "run"
    with training_process(flags(out, corpus_files), tmp_path, point, n) as (proc, ready):
        wait_for(ready.exists, proc.is_alive, what=f"the freeze at {point}:{n}")
        sigkill(proc)

    assert assert_loadable_checkpoint(out) == expected
    if (out / "model.safetensors").exists():  # the inference export is never half written
        load_file(str(out / "model.safetensors"))
    resume(out)
    assert_same_run(reference, out)
    assert checkpoint_names(out) == ["step-0000008", "step-0000012"]
    assert leftovers(out) == []


def test_kill_9_in_the_middle_of_training(tmp_path, corpus_files, reference):
    """A kill between saves loses only the steps since the last checkpoint; the metrics they
    logged are dropped on resume, so the file reads as if the run had never stopped."""
    out = tmp_path / "run"

    def logged() -> bool:
        path = out / "metrics.jsonl"
        return path.exists() and any(m.get("step", 0) >= 6 for m in metrics(out))

    with training_process(flags(out, corpus_files), tmp_path, slow=0.2) as (proc, _):
        wait_for(logged, proc.is_alive, what="step 6")
        sigkill(proc)
    assert assert_loadable_checkpoint(out) == 4
    assert max(m["step"] for m in metrics(out)) >= 6  # logged past the checkpoint
    resume(out)
    assert_same_run(reference, out)


def test_kill_9_during_the_first_save_leaves_a_clear_start_over(tmp_path, corpus_files, reference):
    """Killed before any checkpoint was complete: --resume says there is none and how to start
    over; starting over in the same folder gives the normal run (no stale metrics)."""
    out = tmp_path / "run"
    with training_process(flags(out, corpus_files), tmp_path, "weights", 1) as (proc, ready):
        wait_for(ready.exists, proc.is_alive, what="the first save")
        sigkill(proc)
    with pytest.raises(SystemExit, match="no complete checkpoint") as stop:
        train.main(["--resume", str(out)])
    assert "without --resume" in str(stop.value.code)
    train.train(train.config_from_args(flags(out, corpus_files)))
    assert_same_run(reference, out)
    assert leftovers(out) == []


@pytest.mark.slow
def test_kill_9_of_the_command_line_trainer(tmp_path, corpus_files, reference):
    """The same through ``python``: a separate interpreter, killed inside a checkpoint save."""
    out, ready = tmp_path / "run", tmp_path / "frozen"
    env = {
        **os.environ,
        "MINITURING_FAULT": "weights:2",
        "MINITURING_FAULT_READY": str(ready),
        "OMP_NUM_THREADS": "1",
    }
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.faults", *flags(out, corpus_files)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(ready.exists, lambda: proc.poll() is None, what="the freeze")
        finally:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()
    assert assert_loadable_checkpoint(out) == 4
    resume(out)
    assert_same_run(reference, out)


# ---------------------------------------------------------------------------- SIGTERM / SIGINT


def test_sigterm_checkpoints_says_how_to_resume_and_exits_143(tmp_path, corpus_files):
    """The pre-emption signal: the current step is finished and saved, the message says how to
    continue, and the exit status is 128 + 15, what a shell reports for a process SIGTERM
    ended, so a scheduler or a script sees that the run did not complete."""
    out = tmp_path / "run"
    argv = flags(out, corpus_files, "--max-steps", "200", "--save-every", "1000")
    env = {**os.environ, "MINITURING_SLOW_STEPS": "0.1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.faults", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2,
            lambda: proc.poll() is None,
            what="two metrics lines",
        )
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert f"Continue with: python train.py --resume {out}" in output
    step = assert_loadable_checkpoint(out)
    assert 4 <= step < 200
    assert max(m["step"] for m in metrics(out)) <= step
    assert not (out / "samples.json").exists()  # no slow extras while being pre-empted
    resume(out, "--max-steps", str(step + 2))
    assert latest_step(out) == step + 2


def test_sigint_is_the_same_with_exit_status_130(tmp_path, corpus_files):
    out = tmp_path / "run"
    argv = flags(out, corpus_files, "--max-steps", "200", "--save-every", "1000")
    with training_process(argv, tmp_path, slow=0.1) as (proc, _):
        wait_for(
            lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 1,
            proc.is_alive,
            what="a metrics line",
        )
        os.kill(proc.pid, signal.SIGINT)
        proc.join(120)
    assert proc.exitcode == 128 + signal.SIGINT
    assert "Continue with: python train.py --resume" in (tmp_path / "child.log").read_text()
    assert 2 <= assert_loadable_checkpoint(out) < 200


@pytest.mark.slow
@needs_gloo
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, corpus_files):
    """The signal reaches the processes of a job at different moments (here: only rank 1).
    They agree to stop after the same step, save one checkpoint together and exit; without
    the agreement rank 0 would wait forever in the next step's all-reduce."""
    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    argv = flags(out, corpus_files, "--max-steps", "200", "--save-every", "1000")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MINITURING_SLOW_STEPS": "0.2",
        "MINITURING_PID_DIR": str(pids),
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*launcher, "-m", "bench.faults", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                (pids / "rank-1.pid").exists()
                and (out / "metrics.jsonl").exists()
                and len(metrics(out)) >= 1
            ),
            lambda: proc.poll() is None,
            what="the first metrics line",
        )
        os.kill(int((pids / "rank-1.pid").read_text()), signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stopped = [line for line in output.splitlines() if "stopped by signal 15 at step" in line]
    assert len(stopped) == 1, output[-3000:]  # rank 0 reports, for both
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert assert_loadable_checkpoint(out) == step < 200
    assert max(m["step"] for m in metrics(out)) <= step


def test_second_ctrl_c_stops_at_once(tmp_path, corpus_files, monkeypatch):
    class TwoCtrlC(MixtureLoader):
        def next_batch(self):
            if self.position.batches == 3:
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
            return super().next_batch()

    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(flags(out, corpus_files, "--save-every", "1000"), make_loader=TwoCtrlC)
    assert stop.value.code == 128 + signal.SIGINT
    assert not (out / "checkpoints" / "latest").exists()  # no save: the user insisted
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


# ---------------------------------------------------------------------------- non-finite steps


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


# One forward pass a step: no batch split into pieces (--max-batch-tokens).
WHOLE = ["--max-batch-tokens", "0"]


@pytest.fixture
def poison(monkeypatch):
    """poison({step: "loss" | "grad"}): at those (1-based) training steps the forward pass gives
    a NaN loss, or a finite loss whose gradient is infinite. It counts forward passes, so the
    runs it poisons keep each batch whole (WHOLE)."""

    def apply(bad: dict[int, str]) -> None:
        real = MiniTuringModel.forward
        seen = {"steps": 0}

        def forward(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            if self.training and out.loss is not None:
                seen["steps"] += 1
                kind = bad.get(seen["steps"])
                if kind == "loss":
                    out.loss = out.loss * float("nan")
                elif kind == "grad":
                    out.loss = _InfiniteGradient.apply(out.loss)
            return out

        monkeypatch.setattr(MiniTuringModel, "forward", forward)

    return apply


def all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in weights.values())


def test_non_finite_steps_are_skipped_and_counted(tmp_path, corpus_files, poison, capsys):
    poison({3: "loss", 4: "loss", 7: "grad"})
    out = tmp_path / "run"
    train.train(train.config_from_args(flags(out, corpus_files, *WHOLE, "--max-bad-steps", "3")))
    output = capsys.readouterr().out
    assert "step 3: non-finite loss or gradient, step skipped" in output
    assert "step 7: non-finite" in output and "3 steps skipped" in output
    final = out / "checkpoints" / "step-0000012"
    state = json.loads((final / "state.json").read_text())
    assert state["step"] == STEPS and state["skipped_steps"] == 3
    # Skipped means no optimizer update: AdamW counted 12 - 3 updates.
    optimizer = torch.load(final / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {STEPS - 3}
    assert [m["skipped_steps"] for m in metrics(out) if "lr" in m][-1] == 3
    assert all_finite(load_file(str(out / "model.safetensors")))


def test_too_many_bad_steps_in_a_row_stop_with_the_last_good_checkpoint(
    tmp_path, corpus_files, poison
):
    poison({step: "loss" for step in range(5, 100)})
    out = tmp_path / "run"
    argv = flags(out, corpus_files, *WHOLE, "--save-every", "2", "--keep-checkpoints", "3")
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--max-bad-steps", "3"])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "3 consecutive steps" in message
    assert "step-0000006" in message and "intact" in message
    assert checkpoint_names(out) == ["step-0000002", "step-0000004", "step-0000006"]
    # Steps 5 and 6 were skipped: the step-6 checkpoint holds the step-4 weights, unharmed.
    w4 = load_file(str(out / "checkpoints" / "step-0000004" / "model.safetensors"))
    w6 = load_file(str(out / "checkpoints" / "step-0000006" / "model.safetensors"))
    assert all_finite(w6) and all(torch.equal(w4[k], w6[k]) for k in w4)


def test_a_diverging_learning_rate_never_writes_non_finite_weights(tmp_path, corpus_files):
    out = tmp_path / "run"
    argv = flags(out, corpus_files, "--lr", "1e30", "--warmup-steps", "1", "--save-every", "1")
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--max-bad-steps", "2", "--clip-grad", "0"])
    assert str(stop.value.code).startswith("error: ")
    assert "non-finite" in str(stop.value.code)
    for weights in [out / "model.safetensors", *out.glob("checkpoints/step-*/model.safetensors")]:
        assert all_finite(load_file(str(weights))), weights


def test_non_finite_weights_are_never_saved(tmp_path, corpus_files, monkeypatch):
    """An update that turns a weight into NaN while the loss that produced it was finite: the
    next save refuses, and the previous checkpoint stays the latest."""
    real_step = torch.optim.AdamW.step
    updates = {"n": 0}

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        updates["n"] += 1
        if updates["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(flags(out, corpus_files, "--save-every", "1", "--keep-checkpoints", "5"))
    message = str(stop.value.code)
    assert message.startswith("error: ") and "not finite" in message and "step 3" in message
    assert latest_step(out) == 2
    assert "step-0000003" not in checkpoint_names(out)
    for weights in [out / "model.safetensors", *out.glob("checkpoints/step-*/model.safetensors")]:
        assert all_finite(load_file(str(weights))), weights


# ---------------------------------------------------------------------------- disk full


def _no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["weights", "optimizer", "export"])
def test_disk_full_at_a_save_is_a_clear_error_and_loses_nothing(
    tmp_path, corpus_files, reference, monkeypatch, where
):
    """The second save (step 8) finds the disk full: a one-line error that names the problem
    and the intact checkpoint, no half-written files left, and once there is room again
    --resume gives the run that never failed."""
    real_save_file, real_torch_save = checkpoint.save_file, torch.save
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        inside = Path(filename).parent.name.startswith(".step-")
        if (where == "weights" and inside) or (where == "export" and not inside):
            calls["n"] += 1
            if calls["n"] == 2:
                Path(filename).write_bytes(b"\0" * 100)  # some bytes made it to disk
                raise _no_space(filename)
        real_save_file(tensors, filename, metadata=metadata)

    def torch_save(obj, f, *args, **kwargs):
        if where == "optimizer" and Path(f).name == "optimizer.pt":
            calls["n"] += 1
            if calls["n"] == 2:
                raise _no_space(f)
        real_torch_save(obj, f, *args, **kwargs)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_file", save_file)
        patch.setattr(torch, "save", torch_save)
        with pytest.raises(SystemExit) as stop:
            train.main(flags(out, corpus_files))
    message = str(stop.value.code)
    assert message.startswith("error: ") and "No space left on device" in message
    assert "\n" not in message.strip() and "Traceback" not in message
    intact = 8 if where == "export" else 4
    assert f"step-{intact:07d}" in message and f"--resume {out}" in message
    assert assert_loadable_checkpoint(out) == intact
    assert leftovers(out) == []
    resume(out)
    assert_same_run(reference, out)


@pytest.mark.parametrize("error", [errno.EACCES, errno.ENOSPC, errno.EROFS])
def test_unwritable_output_folder_is_refused_before_any_work(
    tmp_path, corpus_files, monkeypatch, error
):
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == ".write-test":
            raise OSError(error, os.strerror(error), str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    loaded = []
    monkeypatch.setattr(prepare, "load_raw", lambda *a: loaded.append(a))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.main(flags(out, corpus_files))
    assert (
        str(stop.value.code) == f"error: cannot write to output folder {out}: {os.strerror(error)}"
    )
    assert loaded == []  # refused before reading any data


def test_output_folder_below_a_file_is_refused(tmp_path, corpus_files):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=f"error: cannot write to output folder {blocker}/run"):
        train.main(flags(blocker / "run", corpus_files))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_folder_is_refused(tmp_path, corpus_files):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(SystemExit, match="cannot write to output folder"):
            train.main(flags(out, corpus_files))
    finally:
        out.chmod(0o700)


# ---------------------------------------------------------------------------- retention


def _record_deletions(monkeypatch) -> list[tuple[str, str, bool]]:
    """Each checkpoint deleted, with what `latest` named at that moment and whether that one
    was complete."""
    seen = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith("step-"):
            latest = (path.parent / "latest").read_text().strip()
            seen.append((path.name, latest, (path.parent / latest / "state.json").is_file()))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    return seen


@pytest.mark.parametrize("keep", [1, 3])
def test_keeps_the_last_k_checkpoints_and_deletes_only_behind_a_complete_one(
    tmp_path, corpus_files, monkeypatch, keep
):
    deletions = _record_deletions(monkeypatch)
    out = tmp_path / "run"
    argv = flags(out, corpus_files, "--max-steps", "10", "--save-every", "2")
    train.train(train.config_from_args(argv + ["--keep-checkpoints", str(keep)]))
    expected = [f"step-{s:07d}" for s in (2, 4, 6, 8, 10)][-keep:]
    assert checkpoint_names(out) == expected
    assert len(deletions) == 5 - keep
    for deleted, latest, complete in deletions:
        assert complete and latest > deleted, (deleted, latest)


def test_checkpoints_of_an_abandoned_future_are_pruned(tmp_path, corpus_files, reference):
    """Resumed from an older checkpoint (say after a bad stretch), the later checkpoints belong
    to a history that no longer happened: they go, and never crowd out the new ones."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "checkpoints" / "latest").write_text("step-0000008")
    resume(out, "--max-steps", "10", "--save-every", "2")
    assert checkpoint_names(out) == ["step-0000008", "step-0000010"]


def test_resuming_a_finished_run_leaves_its_checkpoint_alone(run_copy, monkeypatch):
    """Nothing left to train: the latest checkpoint is not rewritten (which would mean deleting
    it, for a moment, before its replacement is in place)."""
    deletions = _record_deletions(monkeypatch)
    state = run_copy / "checkpoints" / "step-0000012" / "state.json"
    before = state.stat().st_mtime_ns
    resume(run_copy)
    assert deletions == [] and latest_step(run_copy) == STEPS
    assert state.stat().st_mtime_ns == before


# ---------------------------------------------------------------------------- safe loading


class _Payload:
    """Unpickling this creates ``marker``: code running where only data was expected."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def run_copy(tmp_path, reference) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


@pytest.mark.parametrize("victim", ["optimizer.pt", "rng.pt"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused(tmp_path, run_copy, victim):
    marker = tmp_path / "code-ran"
    path = run_copy / "checkpoints" / "step-0000012" / victim
    torch.save(_Payload(str(marker)), path)
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(run_copy), "--max-steps", "14"])
    message = str(stop.value.code)
    assert message.startswith("error: ") and str(path) in message and "refused" in message
    assert not marker.exists()
    assert latest_step(run_copy) == STEPS  # nothing was trained or saved
    torch.load(path, weights_only=False)  # the payload is live: loaded unsafely, it runs
    assert marker.exists()


def test_a_pickle_in_place_of_checkpoint_weights_is_refused(tmp_path, run_copy):
    marker = tmp_path / "code-ran"
    path = run_copy / "checkpoints" / "step-0000012" / "model.safetensors"
    torch.save(_Payload(str(marker)), path)
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(run_copy), "--max-steps", "14"])
    message = str(stop.value.code)
    assert str(path) in message and "safetensors" in message
    assert not marker.exists()


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, corpus_files) -> Path:
    """A run checkpointed by torch.distributed.checkpoint (FSDP on one process), trained in a
    child process so that its process group stays out of this one."""
    folder = tmp_path_factory.mktemp("sharded")
    out = folder / "run"
    with training_process(flags(out, corpus_files, "--strategy", "fsdp"), folder) as (proc, _):
        proc.join(300)
    assert proc.exitcode == 0, (folder / "child.log").read_text()[-3000:]
    assert (out / "checkpoints" / "step-0000012" / "dcp" / ".metadata").is_file()
    return out


def _poison_sharded(folder: Path, where: str, marker: Path) -> bytes:
    """Put a payload in the checkpoint's metadata, or in place of one non-tensor entry (the
    optimizer's hyper-parameters are stored as pickled bytes). Returns the payload's bytes."""
    import dataclasses

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = folder / ".metadata"
    if where == "metadata":
        meta_path.write_bytes(pickle.dumps(_Payload(str(marker))))
        return meta_path.read_bytes()
    metadata = pickle.loads(meta_path.read_bytes())
    index = next(
        i
        for i in metadata.storage_data
        if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    info = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save(_Payload(str(marker)), blob)
    data = folder / info.relative_path
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(blob.getvalue())
    metadata.storage_data[index] = dataclasses.replace(
        info, offset=offset, length=len(blob.getvalue())
    )
    meta_path.write_bytes(pickle.dumps(metadata))
    return blob.getvalue()


@needs_gloo
def test_a_sharded_checkpoint_still_resumes(tmp_path, sharded_run):
    """The checks below let a genuine sharded checkpoint through (here into one plain process)."""
    out = tmp_path / "run"
    shutil.copytree(sharded_run, out)
    resume(out, "--strategy", "auto", "--max-steps", "14")
    assert latest_step(out) == 14


@needs_gloo
@pytest.mark.parametrize("where", ["metadata", "entry"])
def test_a_malicious_sharded_checkpoint_is_refused(tmp_path, sharded_run, where):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(sharded_run, out)
    folder = out / "checkpoints" / "step-0000012" / "dcp"
    payload = _poison_sharded(folder, where, marker)
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(out), "--strategy", "auto", "--max-steps", "14"])
    message = str(stop.value.code)
    assert message.startswith("error: refused to load") and str(folder) in message
    assert not marker.exists()
    # The payload is live: read as DCP itself reads it (plain pickle for the metadata,
    # torch.load(weights_only=False) for an entry), it runs.
    if where == "metadata":
        pickle.loads(payload)
    else:
        torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _other_tokenizer(folder: Path, texts) -> None:
    from data.vocab import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(texts[:300], vocab_size=330), folder)


MISMATCHES = {
    # name: (how the folder is broken, what model.load must name, what --resume must name)
    "vocabulary size": (
        lambda f, texts: _edit_config(f, vocab_size=1024),
        r"embed\.weight has shape \(448, 32\), config implies \(1024, 32\)",
        "vocab_size",
    ),
    "tokenizer": (_other_tokenizer, "tokenizer has 400 entries, it has 330", "400 entries"),
    "special tokens": (
        lambda f, texts: _edit_config(f, mask_token_id=1),
        "mask_token_id=1 but the tokenizer's is",
        "mask_token_id=1 but the tokenizer's is",
    ),
    "shapes": (
        lambda f, texts: _edit_config(f, hidden_size=64),
        r"has shape \(448, 32\), config implies \(448, 64\)",
        "hidden_size",
    ),
    # The preset is a label of the shape config.json spells out: the model loads as that shape
    # (None: no error), while a resumed run, which builds its model from the options, refuses.
    "preset": (lambda f, texts: _edit_config(f, preset="small"), None, "preset"),
}


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_inconsistent_run_folder_is_refused_naming_the_mismatch(run_copy, texts, name):
    breaks, on_load, on_resume = MISMATCHES[name]
    breaks(run_copy, texts)
    if on_load is None:
        assert api.load(run_copy).config.hidden_size == 32
    else:
        with pytest.raises(RunFolderError, match=on_load):
            api.load(run_copy)
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(run_copy), "--max-steps", "14"])
    message = str(stop.value.code)
    assert message.startswith("error: "), message
    assert on_resume in message and str(run_copy) in message, message
    assert latest_step(run_copy) == STEPS


@pytest.mark.parametrize(
    "flag, value", [("--hidden-size", "64"), ("--num-layers", "3"), ("--preset", "small")]
)
def test_resume_refuses_flags_that_change_the_model(run_copy, flag, value):
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(run_copy), flag, value])
    message = str(stop.value.code)
    assert message.startswith("error: ") and flag.lstrip("-").replace("-", "_") in message


def test_checkpoint_weights_from_another_model_are_refused(tmp_path, run_copy):
    path = run_copy / "checkpoints" / "step-0000012" / "model.safetensors"
    weights = load_file(str(path))
    weights["embed.weight"] = torch.zeros(3, 3)
    save_file(weights, str(path))
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(run_copy), "--max-steps", "14"])
    message = str(stop.value.code)
    assert str(path) in message and "shape (3, 3)" in message
