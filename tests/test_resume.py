"""Exact resume: a run stopped at any step and resumed from its checkpoint logs the same losses
and ends with the same weights as the run that was never stopped, for every objective mix, with
gradient accumulation, with dropout, and under a time budget; the data position resumes in
O(1), without replaying the data already consumed.

A run is stopped the way a cluster stops it: SIGTERM arrives while a chosen step is computed,
the trainer finishes that step, checkpoints and exits. Metrics are logged every step, so the
comparison is step by step whatever logging window the interruption falls in.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, latest_step, metrics, train_flags
from fault_runner import assert_same_run

import train
from data.batching import MixtureLoader
from trainer.loop import Stopped
from trainer.schedule import UNMEASURED_FINAL_SHARE

STEPS = 12


pytestmark = pytest.mark.usefixtures("without_plot")


def flags(out, corpus_files, *extra: str) -> list[str]:
    return train_flags(out, corpus_files, "--max-steps", str(STEPS), "--log-every", "1", *extra)


def run_to_end(argv: list[str], **seams) -> None:
    train.train(train.config_from_args(argv), **seams)


def run_until_signal(argv: list[str], stop_at: int, sig=signal.SIGTERM) -> int:
    """Train, sending ``sig`` to this process while step ``stop_at`` (1-based) is being computed;
    returns the exit status the trainer asks for (``train.main``'s)."""
    cfg = train.config_from_args(argv)
    try:
        train.train(cfg, make_loader=interrupting(MixtureLoader, stop_at, cfg, sig))
    except Stopped as stop:
        return 128 + stop.signum
    return 0


def interrupting(base: type, stop_at: int, cfg, sig=signal.SIGTERM) -> type:
    """A loader class that raises ``sig`` when step ``stop_at``'s first micro-batch is drawn."""
    first_micro_batch = (stop_at - 1) * cfg.optim.grad_accum

    class Interrupting(base):
        def next_batch(self):
            if self.position.batches == first_micro_batch:
                signal.raise_signal(sig)
            return super().next_batch()

    return Interrupting


def resume(out, *extra: str, **seams) -> None:
    run_to_end(["--resume", str(out), *extra], **seams)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, corpus_files):
    """Uninterrupted runs, trained once per configuration and shared by the tests."""
    done = {}

    def get(name: str, *extra: str):
        if name not in done:
            out = tmp_path_factory.mktemp("straight") / name
            run_to_end(flags(out, corpus_files, *extra))
            done[name] = out
        return done[name]

    return get


CASES = {
    # all three objectives, with dropout: the RNG state must travel with the checkpoint
    "mix": ["--dropout", "0.1"],
    "masked_lm": ["--objectives", "masked_lm=1"],
    "gap_summary": ["--objectives", "gap_summary=1"],
    "summarize": ["--objectives", "summarize=1"],
    "accumulation": ["--grad-accum", "3", "--dropout", "0.1"],
}


@pytest.mark.parametrize(
    "case, stop_at",
    [("mix", 1), ("mix", 6), ("mix", 11), ("masked_lm", 7), ("gap_summary", 5),
     ("summarize", 7), ("accumulation", 5)],
)  # fmt: skip
def test_stopped_and_resumed_equals_uninterrupted(
    tmp_path, corpus_files, straight_runs, case, stop_at
):
    straight = straight_runs(case, *CASES[case])
    out = tmp_path / "stopped"
    status = run_until_signal(flags(out, corpus_files, *CASES[case]), stop_at)
    assert status == 128 + signal.SIGTERM
    assert latest_step(out) == stop_at
    assert [m["step"] for m in metrics(out) if "lr" in m] == list(range(1, stop_at + 1))
    resume(out)
    assert latest_step(out) == STEPS
    assert_same_run(straight, out)


def test_dropout_is_active_in_the_resume_test(straight_runs):
    """Guards the test above: dropout changes the computation, so an RNG state lost on resume
    (different dropout masks after step k) would show there."""
    with_dropout = straight_runs("mix", *CASES["mix"])
    without = straight_runs("mix-no-dropout")
    a = [m["grad_norm"] for m in metrics(with_dropout) if "lr" in m]
    b = [m["grad_norm"] for m in metrics(without) if "lr" in m]
    assert a[0] != pytest.approx(b[0], rel=1e-4)


def test_resume_reads_only_the_data_it_trains_on(tmp_path, corpus_files):
    """The data position is a few integers: resuming at step k draws exactly the remaining
    micro-batches, never the k consumed ones again (no "skip N batches")."""
    out = tmp_path / "run"
    argv = flags(out, corpus_files, "--grad-accum", "2")
    run_until_signal(argv, stop_at=8)
    built = []

    class Counting(MixtureLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.examples = 0
            built.append(self)
            for stream in self.streams.values():
                real = stream.batch

                def batch(indices, keys, seed, _real=real):
                    self.examples += len(indices)
                    return _real(indices, keys, seed)

                stream.batch = batch

    resume(out, make_loader=Counting)
    (loader,) = built
    micro_batches = (STEPS - 8) * 2
    assert loader.position.batches == STEPS * 2
    assert loader.examples == micro_batches * 8  # --batch-size 8 per micro-batch


def test_data_position_far_into_training_is_reached_in_constant_time(corpus_files, tokenizer):
    """Jumping to micro-batch 10^12 (epochs deep) costs no more than drawing the first one."""
    from data.batching import MaskedLMStream
    from data.objectives.masked_lm import MaskingConfig
    from data.vocab import word_start_table
    from model.tokenizer import special_ids

    flat = np.arange(10_000, dtype=np.int32) % (len(tokenizer) - 10) + 10
    ids = special_ids(tokenizer)
    stream = MaskedLMStream(
        flat, 32, ids, MaskingConfig(), word_start=word_start_table(tokenizer),
        vocab_size=len(tokenizer),
    )  # fmt: skip
    loader = MixtureLoader({"masked_lm": stream}, {"masked_lm": 1.0}, 8, seed=0)
    far = {"batches": 10**12, "consumed": {"masked_lm": 8 * 10**12}}
    loader.load_state_dict(far)
    start = time.perf_counter()
    name, batch = loader.next_batch()
    assert time.perf_counter() - start < 2.0
    assert name == "masked_lm" and batch["input_ids"].shape == (8, 32)
    assert loader.state_dict() == {"batches": 10**12 + 1, "consumed": {"masked_lm": 8 * 10**12 + 8}}


# ---------------------------------------------------------------------------- time budget


class _BatchClock:
    """A clock that reads one second per micro-batch this process has drawn, so a
    time-budgeted run's plan (fitted from the measured speed) and its stop are the same on
    every run and machine; preparation, evaluation and saving take no time on it."""

    def __init__(self) -> None:
        self.drawn = 0

    def perf_counter(self) -> float:
        return float(self.drawn)


def clocked(stop_at: int | None = None, cfg=None) -> dict:
    """The seams that drive a run's clock by the micro-batches drawn; optionally SIGTERM at
    step ``stop_at``."""
    clock = _BatchClock()
    base = interrupting(MixtureLoader, stop_at, cfg) if stop_at else MixtureLoader

    class Counted(base):
        def next_batch(self):
            clock.drawn += 1
            return super().next_batch()

    return {"clock": clock.perf_counter, "make_loader": Counted}


@pytest.mark.parametrize("stop_at", [10, 24])
def test_time_budgeted_run_resumes_with_the_same_schedule(tmp_path, corpus_files, stop_at):
    """The budget fixes the schedule's length after 20 steps; a run resumed after that keeps
    the planned length (saved in the checkpoint) instead of planning anew."""
    budget = ["--max-steps", "1000", "--time-budget", "30", "--warmup-steps", "3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_to_end(flags(straight, corpus_files, *budget), **clocked())
    # 30 "seconds" at one second per step, less what the final evaluation and checkpoint are
    # assumed to take while neither has been timed.
    kept_back = 2 * UNMEASURED_FINAL_SHARE * 30
    assert latest_step(straight) == int(30 - kept_back) == 28

    cfg = train.config_from_args(flags(stopped, corpus_files, *budget))
    with pytest.raises(Stopped):
        train.train(cfg, **clocked(stop_at, cfg))
    assert latest_step(stopped) == stop_at
    resume(stopped, **clocked())
    assert latest_step(stopped) == 28
    assert_same_run(straight, stopped)


def test_the_commands_start_up_counts_in_the_budget(tmp_path, corpus_files):
    """What the process spent before training (train.py's imports: ``startup``) is part of
    the budget: 5 of 30 seconds gone leaves the steps that fit in 25."""
    budget = ["--max-steps", "1000", "--time-budget", "30", "--warmup-steps", "3"]
    out = tmp_path / "late"
    run_to_end(flags(out, corpus_files, *budget), startup=5.0, **clocked())
    assert latest_step(out) == int(30 - 5 - 2 * UNMEASURED_FINAL_SHARE * 30) == 23


def test_process_age_counts_what_ran_before_it():
    code = "import time; time.sleep(0.6); import train; print(train.process_age())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert 0.6 <= float(out.stdout) < 60


def test_a_stopped_run_keeps_the_checkpoints_of_one_never_stopped(
    tmp_path, corpus_files, straight_runs
):
    """The checkpoint a signal forced (step 9, off the --save-every 4 schedule) goes once the
    resumed run has a newer one: the folder then holds what the uninterrupted run's holds."""
    schedule = ["--save-every", "4", "--keep-checkpoints", "2"]
    straight = straight_runs("saved every 4", *schedule)
    out = tmp_path / "stopped"
    assert run_until_signal(flags(out, corpus_files, *schedule), 9) != 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-0000008", "step-0000009",
    ]  # fmt: skip
    resume(out)
    kept = lambda run: sorted(p.name for p in (run / "checkpoints").glob("step-*"))  # noqa: E731
    assert kept(out) == kept(straight) == ["step-0000008", "step-0000012"]
    assert_same_run(straight, out)
