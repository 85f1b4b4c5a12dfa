"""--patience N: a run whose validation score has not improved in N evaluations in a row enters
its final decay at once (the learning rate down to its floor over --decay-share of the steps
done), then stops; exactly resumable, agreed by every rank, refused without validation.

Ties are not improvements (as for the kept weights: only a strictly better score replaces
them), and neither is a non-finite score. The runs below score their validation evaluations by
step (``SCORES``), so the countdown is the same on every machine."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, metrics, train_flags
from fault_runner import assert_same_run
from safetensors.torch import load_file

import train
from trainer import keep, loop
from trainer.config import OptimConfig
from trainer.errors import TrainingError
from trainer.evaluate import Evaluation
from trainer.optim import final_decay_lr, lr_at
from trainer.patience import after_evaluation, count, decay_steps, ran_out
from trainer.prepare import TrainState

# ---------------------------------------------------------------------------- the countdown


def test_an_improvement_resets_the_count_and_anything_else_adds_one():
    assert count(0, improved=False) == 1
    assert count(3, improved=False) == 4
    assert count(3, improved=True) == 0


def countdown(scores: list[float], patience: int, higher: bool = False) -> list[int | None]:
    """Feed validation scores through keep_if_best and the countdown as the loop does; per
    evaluation, the count, or None once patience has run out (at that evaluation)."""
    state = TrainState()
    run = SimpleNamespace(
        state=state,
        env=SimpleNamespace(distributed=False),
        cfg=SimpleNamespace(run=SimpleNamespace(patience=patience)),
        checkpointer=None,
        model=None,
    )
    out: list[int | None] = []
    for step, score in enumerate(scores, 1):
        state.step = step
        results = Evaluation({"masked_lm/loss": score})
        improved = keep.keep_if_best(run, results, ("masked_lm/loss", higher))
        after_evaluation(state, improved)
        if ran_out(run):
            out.append(None)
            state.stopping = {"step": step}
        else:
            out.append(state.evaluations_without_improvement)
    return out


@pytest.fixture
def no_weights_written(monkeypatch):
    monkeypatch.setattr(keep, "save_kept_weights", lambda *a: None)


def test_a_tie_is_not_an_improvement(no_weights_written):
    assert countdown([3.0, 2.0, 2.0, 2.5], patience=3) == [0, 0, 1, 2]
    assert countdown([3.0, 2.0, 2.0, 2.5], patience=2) == [0, 0, 1, None]
    # higher is better (ROUGE-L): the same
    assert countdown([10.0, 12.0, 12.0, 11.0], patience=2, higher=True) == [0, 0, 1, None]


def test_an_improvement_restarts_the_countdown(no_weights_written):
    assert countdown([3.0, 4.0, 2.0, 5.0, 5.0, 1.0], patience=3) == [0, 1, 0, 1, 2, 0]


def test_a_non_finite_score_is_not_an_improvement(no_weights_written):
    assert countdown([3.0, math.nan, math.inf, 1.0], patience=3) == [0, 1, 2, 0]
    assert countdown([math.nan, math.nan], patience=2) == [1, None]


def test_patience_runs_out_once(no_weights_written):
    # The count goes on in the final decay (for the record), but the decision is taken once.
    assert countdown([1.0, 2.0, 2.0, 2.0, 2.0], patience=2) == [0, 1, None, 3, 4]


def test_patience_off_never_runs_out(no_weights_written):
    assert countdown([1.0] + [2.0] * 10, patience=0) == [0] + list(range(1, 11))


def test_the_final_stretch_is_the_decay_share_of_the_steps_done_within_the_plan():
    assert decay_steps(1000, 4000, 0.2) == 200
    assert decay_steps(1000, 1100, 0.2) == 100  # bounded by the plan
    assert decay_steps(3, 40, 0.2) == 1  # at least one step
    assert decay_steps(12, 40, 0.5) == 6


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_the_final_decay_falls_monotonically_to_the_floor(schedule):
    cfg = OptimConfig(lr=1e-3, min_lr_ratio=0.1, schedule=schedule)
    rate = 8e-4  # the rate when patience ran out, after step 100; the run ends at step 120
    rates = [final_decay_lr(step, 100, 120, rate, cfg) for step in range(100, 120)]
    assert rates[0] < rate
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False)), rates
    assert rates[-1] == pytest.approx(1e-4)  # the last step trains at the floor
    # A rate already below the floor (patience ran out in the warm-up) is never raised.
    assert final_decay_lr(100, 100, 120, 5e-5, cfg) == 5e-5


# ---------------------------------------------------------------------------- a run

# The validation masked-LM loss of each evaluation (lower is better), every 3 steps: step 6 is
# the best; step 9 ties it (no improvement: 1), step 12 is worse (2 = --patience): the decay
# starts after step 12 and lasts half the steps done (--decay-share 0.5), so the run ends at
# step 18 of its 40. Step 15, in the decay, is the best of all: its weights are kept.
SCORES = {3: 3.0, 6: 2.0, 9: 2.0, 12: 2.5, 15: 1.0}
FLAGS = ["--objectives", "masked_lm=1", "--max-steps", "40", "--eval-every", "3"]
FLAGS += ["--patience", "2", "--decay-share", "0.5", "--log-every", "1"]
FLAGS += ["--save-every", "3", "--keep-checkpoints", "10"]


def run(argv: list[str]) -> None:
    train.train(train.config_from_args(argv))


def scored_evaluation(real):
    def run_evaluation(run, progress, split="eval", model=None):
        results = real(run, progress, split, model)
        if split == "val":
            results["masked_lm/loss"] = SCORES.get(run.state.step, 5.0)
        return results

    return run_evaluation


@pytest.fixture(scope="module", autouse=True)
def scored():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "run_evaluation", scored_evaluation(loop.run_evaluation))
        patch.setattr(loop, "write_training_curves", lambda folder, **_: None)
        yield


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus_files):
    out = tmp_path_factory.mktemp("patience") / "straight"
    run(train_flags(out, corpus_files, *FLAGS))
    return out


def test_patience_ends_the_run_after_a_decay_to_the_floor(straight):
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 18 < 40
    assert summary["stopped"] == {
        "reason": "patience",
        "step": 12,
        "evaluations_without_improvement": 2,
        "decay_steps": 6,
        "planned_steps": 40,
        "ended_at": 18,
    }
    rates = [m["lr"] for m in metrics(straight) if "lr" in m]
    assert len(rates) == 18
    # Up to the decision, the schedule of the 40 planned steps (wsd: warm-up, then the peak).
    cfg = OptimConfig(lr=5e-4, warmup_steps=5)
    assert rates[:12] == [pytest.approx(lr_at(i, 40, cfg)) for i in range(12)]
    decay = rates[11:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False)), decay
    assert rates[-1] == pytest.approx(5e-4 * 0.1)  # the floor, at the last step


def test_the_best_evaluation_is_still_the_kept_one(straight):
    kept = json.loads((straight / "summary.json").read_text())["kept"]
    assert kept["step"] == 15 and kept["value"] == 1.0
    at_15 = load_file(str(straight / "checkpoints" / "step-0000015" / "model.safetensors"))
    final = load_file(str(straight / "model.safetensors"))
    assert all(torch.equal(at_15[k], final[k]) for k in at_15)
    evaluated = [m["step"] for m in metrics(straight) if "val/masked_lm/loss" in m]
    assert evaluated == [3, 6, 9, 12, 15, 18]


def test_the_log_says_why_and_when(tmp_path, corpus_files, capsys):
    run(train_flags(tmp_path / "run", corpus_files, *FLAGS, "--max-steps", "14"))
    out = capsys.readouterr().out
    # Planned for 14 steps: the decay (6 steps after 12) is bounded by the plan.
    assert "patience: no validation improvement in 2 evaluations (best val/masked_lm/loss 2 " \
        "at step 6); decaying the learning rate to its floor over 2 steps, then stopping " \
        "at step 14 of the 14 planned" in out  # fmt: skip
    assert "stopped early by --patience: no validation improvement in 2 evaluations by " \
        "step 12, then 2 steps of learning-rate decay: 14 steps" in out  # fmt: skip
    rates = [m["lr"] for m in metrics(tmp_path / "run") if "lr" in m]
    assert rates[-1] == pytest.approx(5e-5) and rates[-2] < rates[-3]


def _stopped_at(argv: list[str], stop_at: int) -> None:
    from test_resume import run_until_signal

    assert run_until_signal(argv, stop_at) == 128 + signal.SIGTERM


@pytest.mark.parametrize("stop_at", [10, 12, 14])
def test_resumed_in_the_countdown_or_the_decay_equals_uninterrupted(
    tmp_path, corpus_files, straight, stop_at
):
    """SIGTERM in the countdown (step 10: one evaluation without improvement), at the step
    whose evaluation runs out of patience (12), and in the final decay (14); resumed, the run
    stops where the uninterrupted one did, with the same curve and bitwise the same weights."""
    out = tmp_path / "stopped"
    _stopped_at(train_flags(out, corpus_files, *FLAGS), stop_at)
    state = json.loads((out / "checkpoints" / f"step-{stop_at:07d}" / "state.json").read_text())
    assert state["evaluations_without_improvement"] == {10: 1, 12: 2, 14: 2}[stop_at]
    assert (state["stopping"] is None) == (stop_at < 12)
    run(["--resume", str(out)])
    assert_same_run(straight, out)
    for name in ("model.safetensors", "checkpoints/step-0000018/model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    summaries = [json.loads((r / "summary.json").read_text()) for r in (straight, out)]
    assert summaries[0]["stopped"] == summaries[1]["stopped"]
    assert summaries[0]["kept"] == summaries[1]["kept"]


def test_under_a_time_budget_no_refit_lengthens_the_decay(tmp_path, corpus_files):
    """A budget of 30 one-second steps plans 28; patience runs out at step 12 and the decay
    (--decay-share 0.8: 10 steps) crosses the refit at step 20, which would plan 28 again: the
    run still ends at step 22, and resumes from the decay to the same end."""
    from test_resume import clocked

    budget = [*FLAGS, "--max-steps", "1000", "--time-budget", "30", "--decay-share", "0.8"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train.train(train.config_from_args(train_flags(straight, corpus_files, *budget)), **clocked())
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 22 and summary["stopped"]["decay_steps"] == 10
    rates = [m["lr"] for m in metrics(straight) if "lr" in m]
    assert rates[-1] == pytest.approx(5e-5) and all(
        a > b for a, b in zip(rates[11:], rates[12:], strict=False)
    )
    cfg = train.config_from_args(train_flags(stopped, corpus_files, *budget))
    with pytest.raises(loop.Stopped):
        train.train(cfg, **clocked(16, cfg))
    train.train(train.config_from_args(["--resume", str(stopped)]), **clocked())
    assert_same_run(straight, stopped)


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--val-fraction", "0"], "--val-fraction is 0"),
        (["--eval-every", "0"], "--eval-every is 0"),
        (["--patience", "-1"], "--patience must be >= 0"),
    ],
)
def test_patience_without_validation_evaluations_is_refused(tmp_path, extra, message):
    cfg = train.config_from_args(
        ["--patience", "3", "--eval-every", "100", "--output-dir", str(tmp_path), *extra]
    )
    with pytest.raises(TrainingError, match=message):
        train.train(cfg)
    assert not (tmp_path / "config.json").exists()  # before any work


def test_patience_with_streaming_is_refused(tmp_path, small_corpus):
    train_file, _ = small_corpus
    argv = ["--streaming", "--train-text", str(train_file), "--objectives", "masked_lm=1"]
    argv += ["--patience", "2", "--eval-every", "3", "--output-dir", str(tmp_path)]
    with pytest.raises(TrainingError, match="--streaming has no validation split"):
        train.train(train.config_from_args(argv))


def test_an_empty_validation_split_is_refused(tmp_path, corpus_files, monkeypatch):
    monkeypatch.setattr(loop, "selection", lambda run: None)
    argv = train_flags(tmp_path / "run", corpus_files, *FLAGS)
    with pytest.raises(TrainingError, match="the validation split is empty"):
        train.train(train.config_from_args(argv))


# ---------------------------------------------------------------------------- DDP

# Two ranks whose own validation scores disagree (rank 1's always improve): rank 0's decides on
# both (``rank0_value``), so both stop where one process does.
RUNNER = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import torch
import distributed_runner, test_patience
from trainer import loop

real = loop.run_evaluation
def run_evaluation(run, progress, split="eval", model=None):
    results = real(run, progress, split, model)
    if split == "val":
        rank = torch.distributed.get_rank()
        results["masked_lm/loss"] = test_patience.SCORES.get(run.state.step, 5.0) if rank == 0 \\
            else 10.0 - run.state.step
    return results
loop.run_evaluation = run_evaluation
loop.write_training_curves = lambda folder, **_: None
distributed_runner.main(sys.argv[1])
"""


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)
def test_two_ddp_ranks_stop_together_as_one_process_does(tmp_path, corpus_files, straight):
    out = tmp_path / "ddp"
    (tmp_path / "runs.json").write_text(
        json.dumps([train_flags(out, corpus_files, *FLAGS, "--batch-size", "4")])
    )
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(repo=str(ROOT), tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path / "runs.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    summaries = [json.loads((r / "summary.json").read_text()) for r in (straight, out)]
    assert summaries[1]["processes"] == 2
    assert summaries[1]["stopped"] == summaries[0]["stopped"]
    assert summaries[1]["kept"]["step"] == summaries[0]["kept"]["step"] == 15
    assert_same_run(straight, out, rel=1e-4, abs_=1e-5)
