"""train.py end to end on a tiny model: loss falls, the run folder is complete, resume is
exact, and the CLI rejects what it cannot do."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_FLAGS, metrics, train_flags
from fault_runner import assert_same_run
from safetensors.torch import load_file
from transformers import AutoTokenizer

import train
from trainer.errors import TrainingError


def run(tmp_path: Path, corpus_files, *extra: str, name: str = "run") -> Path:
    out = tmp_path / name
    train.train(train.config_from_args(train_flags(out, corpus_files, *extra)))
    return out


def test_loss_falls_for_every_objective(tmp_path, corpus_files):
    # Unsmoothed: the logged training loss of a smoothed summary has the uniform term's floor.
    flags = ["--max-steps", "60", "--lr", "3e-3", "--log-every", "10", "--label-smoothing", "0"]
    out = run(tmp_path, corpus_files, *flags)
    lines = [m for m in metrics(out) if "lr" in m]
    for name in ("masked_lm", "gap_summary", "summarize"):
        curve = [m[f"loss/{name}"] for m in lines if f"loss/{name}" in m]
        # The end is the last two 10-step windows: one window of one objective is a few batches.
        assert sum(curve[-2:]) / 2 < curve[0] - 0.5, (name, curve)
    evals = [m for m in metrics(out) if "eval/masked_lm/accuracy" in m]
    assert evals and {"eval/summarize/rougeL", "eval/gap_summary/loss"} <= set(evals[-1])


@pytest.mark.parametrize(
    ("objective", "smoothed"), [("summarize", True), ("gap_summary", True), ("masked_lm", False)]
)
def test_label_smoothing_reaches_the_summaries_only(tmp_path, corpus_files, objective, smoothed):
    """--label-smoothing changes a summarization run's training loss from its first step, and
    leaves a masked-LM run exactly as it was."""

    def losses(smoothing: str) -> list[float]:
        flags = ["--objectives", f"{objective}=1", "--max-steps", "3", "--log-every", "1"]
        out = run(tmp_path, corpus_files, *flags, "--label-smoothing", smoothing, name=smoothing)
        return [m[f"loss/{objective}"] for m in metrics(out) if f"loss/{objective}" in m]

    plain, with_smoothing = losses("0"), losses("0.3")
    assert len(plain) == len(with_smoothing) == 3
    if smoothed:
        assert all(a != b for a, b in zip(plain, with_smoothing, strict=True))
    else:
        assert plain == with_smoothing


def test_run_folder_is_complete_and_loadable(tiny_run):
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
        "metrics.jsonl",
        "training_curves.png",
    ):
        assert (tiny_run / name).is_file(), name
    latest = (tiny_run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-0000012"
    ckpt = tiny_run / "checkpoints" / latest
    assert {"model.safetensors", "optimizer.pt", "rng.pt", "state.json"} <= {
        p.name for p in ckpt.iterdir()
    }
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 12 and "consumed" in state["data"]
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model_type"] == "minituring"
    assert (
        config["training"]["run"]["max_steps"] == 12
    )  # the full configuration travels with the run
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] >= config["tokenizer_size"]
    AutoTokenizer.from_pretrained(tiny_run)
    top = load_file(str(tiny_run / "model.safetensors"))
    inner = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(top[k], inner[k]) for k in top)


def test_training_curves_are_drawn_with_each_checkpoint(tmp_path, corpus_files, monkeypatch):
    # Drawn with the checkpoint, its time is counted in the budget with the checkpoint's; the
    # periodic ones quietly, the final one says where it is.
    from trainer import loop

    drawn = []

    def draw(folder: Path, quiet: bool = False) -> None:
        drawn.append(((folder / "checkpoints" / "latest").read_text().strip(), quiet))

    monkeypatch.setattr(loop, "write_training_curves", draw)
    run(tmp_path, corpus_files, "--max-steps", "12", "--save-every", "6")
    assert drawn == [("step-0000006", True), ("step-0000012", False)]


def test_config_json_reproduces_the_run(tmp_path, tiny_run):
    """Training again from nothing but config.json's options gives the same run."""
    saved = json.loads((tiny_run / "config.json").read_text())["training"]
    cfg = train.TrainConfig.from_dict(saved)
    assert cfg.to_dict() == saved
    cfg.run.output_dir = str(tmp_path / "again")
    train.train(cfg)
    assert_same_run(tiny_run, tmp_path / "again")


def _losses(folder: Path) -> list[tuple]:
    return [
        (m["step"], k, v) for m in metrics(folder) for k, v in m.items() if k.startswith("loss/")
    ]


def test_resume_matches_uninterrupted_run(tmp_path, corpus_files):
    """Stop a 16-step run at step 8 (its step-8 checkpoint), resume: same losses, same weights."""
    straight = run(
        tmp_path,
        corpus_files,
        "--max-steps",
        "16",
        "--save-every",
        "8",
        "--log-every",
        "4",
        name="straight",
    )
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step-0000016")
    (interrupted / "checkpoints" / "latest").write_text("step-0000008")
    (interrupted / "model.safetensors").unlink()
    train.train(train.config_from_args(["--resume", str(interrupted)]))
    a, b = _losses(straight), _losses(interrupted)
    assert len(a) == len(b) and a[-1][0] == 16
    for (s1, k1, v1), (s2, k2, v2) in zip(a, b, strict=True):
        assert (s1, k1) == (s2, k2) and v1 == pytest.approx(v2, rel=1e-5, abs=1e-6)
    wa = load_file(str(straight / "model.safetensors"))
    wb = load_file(str(interrupted / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_resume_can_extend_a_finished_run(tmp_path, corpus_files):
    out = run(tmp_path, corpus_files, "--max-steps", "6", name="short")
    train.train(train.config_from_args(["--resume", str(out), "--max-steps", "10"]))
    assert (out / "checkpoints" / "latest").read_text() == "step-0000010"
    assert [m["step"] for m in metrics(out) if "lr" in m] == [5, 6, 10]


def test_time_budget_stops_and_fits_the_schedule(tmp_path, corpus_files):
    out = run(
        tmp_path, corpus_files, "--max-steps", "100000", "--time-budget", "4", "--warmup-steps", "2"
    )
    latest = (out / "checkpoints" / "latest").read_text().strip()
    state = json.loads((out / "checkpoints" / latest / "state.json").read_text())
    # The schedule was fitted to the speed measured over the first steps, then honoured.
    assert 1 <= state["step"] <= state["planned_steps"] < 100000
    # Every step trained is in the log, the last ones too when the budget ran out.
    trained = [m for m in metrics(out) if "lr" in m]
    assert trained and trained[-1]["step"] == state["step"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == state["step"] and summary["time_budget"] == 4
    # Preparation and the first step come before the end of the run.
    assert 0 < summary["first_step_seconds"] < summary["elapsed"]


def test_long_batches_run_as_pieces_with_the_same_result(tmp_path, corpus_files):
    """--max-batch-tokens runs a micro-batch as pieces for memory (the test flags' default,
    batch 8 x block 32, already splits the 80-position summary batches in four; 40 splits every
    batch): the same losses, gradient norms, evaluations and weights as the batches whole."""
    steps = ["--max-steps", "6", "--log-every", "1", "--eval-every", "3"]
    whole = run(tmp_path, corpus_files, *steps, "--max-batch-tokens", "0", name="whole")
    default = run(tmp_path, corpus_files, *steps, name="default")
    small = run(tmp_path, corpus_files, *steps, "--max-batch-tokens", "40", name="small")
    assert_same_run(whole, default)
    assert_same_run(whole, small)


def test_existing_run_is_not_overwritten(tiny_run, corpus_files):
    with pytest.raises(TrainingError, match="already holds a run"):
        train.train(train.config_from_args(TINY_FLAGS + ["--output-dir", str(tiny_run)]))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--position", "learned", "--seq-len", "1024"], "larger than the model supports"),
        (
            ["--position", "learned", "--source-len", "500", "--target-len", "100"],
            "exceeds --max-positions",
        ),
        (["--mask-rate", "0"], "--mask-rate"),
        (["--batch-size", "0"], "--batch-size"),
        (
            ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"],
            "device",
        ),
        (["--objectives", "masked_lm=1,translate=1"], "unknown objective"),
    ],
)
def test_bad_flags_are_clear_errors(tmp_path, corpus_files, flags, message):
    text_file, pairs = corpus_files
    base = TINY_FLAGS + ["--train-text", str(text_file), "--output-dir", str(tmp_path / "x")]
    with pytest.raises((TrainingError, ValueError), match=message):
        train.train(train.config_from_args(base + flags))


def test_objective_without_its_data_is_named(tmp_path, corpus_files):
    text_file, _ = corpus_files
    flags = TINY_FLAGS + ["--train-text", str(text_file), "--output-dir", str(tmp_path / "x")]
    with pytest.raises(ValueError, match="summarize needs document/summary pairs"):
        train.train(train.config_from_args(flags + ["--objectives", "masked_lm=1,summarize=1"]))


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit):
        train.config_from_args(["--no-such-flag", "1"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.config_from_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--preset", "--max-steps", "--time-budget", "--output-dir", "--resume", "--seed", "--device",
                 "--objectives", "--train-text", "--train-pairs", "--tokenizer", "--batch-size", "--lr",
                 "--precision", "--text-column", "--seq-len"):  # fmt: skip
        assert flag in text


def test_progress_off_a_terminal_is_a_plain_line_per_log_interval(tmp_path, corpus_files, capfd):
    """In a log file or under a scheduler there is no progress bar to redraw: one line per
    --log-every steps, no carriage returns."""
    run(tmp_path, corpus_files, "--max-steps", "10", "--log-every", "5", "--progress")
    out, err = capfd.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 5/10", "step 10/10"]
    assert all(re.search(r"\| loss (\w+=[\d.]+ ?)+ \| \d+ tokens/s \|", line) for line in lines), (
        lines
    )
    assert "\r" not in out + err


def test_the_auto_mixture_puts_the_pairs_first():
    from trainer.config import FEW_PAIRS, PAIRS_AT_FULL_WEIGHT, parse_objectives

    everything = ["masked_lm", "gap_summary", "summarize"]
    assert parse_objectives("auto", everything) == {"masked_lm": 0.25, "summarize": 1.0}
    assert parse_objectives("auto", ["masked_lm", "gap_summary"]) == {
        "masked_lm": 1.0,
        "gap_summary": 1.0,
    }
    assert parse_objectives("auto", ["summarize"]) == {"summarize": 1.0}
    # Few pairs: gap sentences on the text join (where there is text to draw them from), and
    # each pair task weighs its share of PAIRS_AT_FULL_WEIGHT pairs, at most 1.
    few = {"masked_lm": 0.25, "gap_summary": 1.0, "summarize": 450 / PAIRS_AT_FULL_WEIGHT}
    assert parse_objectives("auto", everything, pairs={"summarize": 450}) == few
    assert few["summarize"] == pytest.approx(0.3)
    assert parse_objectives("auto", everything, pairs={"summarize": FEW_PAIRS - 1}) == {
        "masked_lm": 0.25,
        "gap_summary": 1.0,
        "summarize": 1.0,
    }
    assert parse_objectives("auto", everything, pairs={"summarize": FEW_PAIRS}) == {
        "masked_lm": 0.25,
        "summarize": 1.0,
    }
    # Pairs alone: nothing to weigh them against.
    assert parse_objectives("auto", ["summarize"], pairs={"summarize": 448}) == {"summarize": 1.0}
    # Named tasks: each by its own pairs; gap sentences join for the one that has fewest.
    named = parse_objectives(
        "auto", [*everything, "title"], ["title"], pairs={"summarize": 3000, "title": 300}
    )
    assert named == {"masked_lm": 0.25, "gap_summary": 1.0, "summarize": 1.0, "title": 0.2}
    # Spelled out, every objective is trained as asked.
    assert parse_objectives("masked_lm=1,gap_summary=0.5", everything) == {
        "masked_lm": 1.0,
        "gap_summary": 0.5,
    }
