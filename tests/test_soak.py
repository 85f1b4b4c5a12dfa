"""``bench/soak.py``'s checker fails on a divergence, and the resume bugs it found stay fixed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_FLAGS
from safetensors.torch import save_file

import train
from bench import soak


def made_up_run(folder: Path, weight: float = 1.0, loss: float = 2.5, elapsed: float = 1.0):
    ckpt = folder / "checkpoints" / "step-0000004"
    ckpt.mkdir(parents=True)
    weights = {"w": torch.full((3,), weight), "b": torch.zeros(2)}
    save_file(weights, str(folder / "model.safetensors"))
    save_file(weights, str(ckpt / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]},
               ckpt / "optimizer.pt")  # fmt: skip
    (ckpt / "state.json").write_text(json.dumps({"step": 4, "elapsed": elapsed}))
    (folder / "checkpoints" / "latest").write_text("step-0000004")
    lines = [
        {"step": 2, "loss/masked_lm": 3.0, "elapsed": elapsed, "tokens_per_s": 100 * elapsed},
        {"step": 4, "loss/masked_lm": loss, "elapsed": 2 * elapsed, "data_wait": elapsed},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return folder


def test_the_checker_passes_the_same_run_and_flags_every_kind_of_divergence(tmp_path):
    ref = made_up_run(tmp_path / "ref")
    # Wall-clock fields may differ.
    assert soak.compare_runs(ref, made_up_run(tmp_path / "same", elapsed=7.0)) == []
    # One ulp in the weights.
    ulp = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item()
    found = soak.compare_runs(ref, made_up_run(tmp_path / "ulp", weight=ulp))
    assert any("model.safetensors: w differs" in p for p in found), found
    assert soak.compare_runs(ref, tmp_path / "ulp", tol=1e-6) == []
    # A logged loss.
    found = soak.compare_runs(ref, made_up_run(tmp_path / "loss", loss=2.5000001))
    assert found == ["metrics.jsonl line 2 (step 4): ['loss/masked_lm'] differ"]
    # A line more, an optimizer state, a temporary file left behind.
    extra = made_up_run(tmp_path / "extra")
    with open(extra / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "eval/masked_lm": 1.0}) + "\n")
    (extra / "checkpoints" / ".step-0000008.tmp").mkdir()
    optimizer = extra / "checkpoints" / "step-0000004" / "optimizer.pt"
    torch.save({"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]},
               optimizer)  # fmt: skip
    found = soak.compare_runs(ref, extra)
    assert any("3 lines, the reference has 2" in p for p in found), found
    assert any("optimizer.pt: /state/0/exp_avg differs" in p for p in found), found
    assert any("temporary files left" in p and ".step-0000008.tmp" in p for p in found), found


# ---------------------------------------------------------------------------- found by the soak


def flags(out: Path, corpus_files) -> list[str]:
    text, pairs = corpus_files
    return TINY_FLAGS + [
        "--train-text", str(text), "--train-pairs", str(pairs), "--output-dir", str(out),
        "--max-steps", "8", "--save-every", "4", "--log-every", "3", "--eval-every", "6",
        "--keep-checkpoints", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_files, without_plot) -> Path:
    out = tmp_path_factory.mktemp("soak") / "reference"
    train.train(train.config_from_args(flags(out, corpus_files)))
    return out


def test_a_logging_window_cut_by_a_checkpoint_logs_the_same_losses(reference, tmp_path):
    """Resumed from step 4 with a logging window of 3 steps: the line of step 6 averages the
    losses of steps 4 to 6, as the uninterrupted run's does (it used to average 5 and 6)."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step-0000008")
    (out / "checkpoints" / "latest").write_text("step-0000004")
    train.train(train.config_from_args(["--resume", str(out)]))
    assert soak.compare_runs(reference, out) == []


def test_resuming_a_finished_run_logs_nothing_twice(reference, tmp_path):
    """Killed after its last checkpoint (while plotting, say), a run resumed has nothing left
    to do: it used to evaluate again and log the final evaluation a second time."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    train.train(train.config_from_args(["--resume", str(out)]))
    assert soak.compare_runs(reference, out) == []


def test_a_save_cut_short_after_its_pointer_is_finished_on_resume(reference, tmp_path):
    """Killed after ``latest`` named the last checkpoint but before the export and the pruning
    (the 100-kill soak found it): the resumed run, with nothing left to train, finishes them,
    so the folder's weights and checkpoints are the uninterrupted run's."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.copytree(
        reference / "checkpoints" / "step-0000004", out / "checkpoints" / "step-0000000"
    )
    stale = out / "checkpoints" / "step-0000004" / "model.safetensors"
    shutil.copyfile(stale, out / "model.safetensors")  # the previous save's export
    assert soak.compare_runs(reference, out) != []  # the checker sees it
    train.train(train.config_from_args(["--resume", str(out)]))
    assert soak.compare_runs(reference, out) == []
