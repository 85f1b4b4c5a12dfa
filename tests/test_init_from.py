"""--init-from: a new run that starts from another run's weights and tokenizer. The child starts
on the parent's exact weights with a fresh optimizer, takes the parent's model options, refuses
the flags that contradict them by name, records its parent, resumes exactly (from its own
checkpoints, the parent gone), survives a kill -9, and does all this under DDP and FSDP2.

The parent is the session's ``tiny_run`` (12 steps of every objective); the children train
other data (masked LM and summarize at other weights), with other schedules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import latest_step, train_flags
from fault_runner import assert_same_run
from safetensors.torch import load_file
from test_distributed import LOGS, STEPS, launch
from test_distributed import assert_same_run as assert_same_distributed_run
from test_faults import (
    assert_loadable_checkpoint,
    needs_gloo,
    sigkill,
    training_process,
    wait_for,
)
from test_resume import run_until_signal

import train
from trainer.errors import TrainingError
from trainer.prepare import prepare

pytestmark = pytest.mark.usefixtures("without_plot")

# The child's own options: no model option (those are the parent's), another schedule.
RUN = [
    "--batch-size", "8", "--warmup-steps", "2", "--lr", "1e-3", "--eval-every", "0",
    "--eval-batches", "2", "--rouge-samples", "4", "--log-every", "1", "--no-progress",
    "--device", "cpu", "--precision", "fp32", "--objectives", "masked_lm=1,summarize=0.5",
]  # fmt: skip
CHILD_STEPS = ["--max-steps", "12", "--save-every", "4", "--keep-checkpoints", "2"]


def child_flags(parent: Path, out: Path, corpus_files, *extra: str) -> list[str]:
    text, pairs = corpus_files
    data = ["--train-text", str(text), "--train-pairs", str(pairs)]
    return ["--init-from", str(parent), *RUN, *data, "--output-dir", str(out), *extra]


def bare_copy(run: Path, dest: Path, leave_out: str | None = None) -> Path:
    """A folder that ``model.load`` reads and nothing more (no training record, no checkpoint),
    optionally without one of its files."""
    dest.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if name != leave_out:
            shutil.copy(run / name, dest / name)
    if leave_out != "config.json":  # drop the training options the trainer records
        config = json.loads((dest / "config.json").read_text())
        config.pop("training")
        (dest / "config.json").write_text(json.dumps(config))
    return dest


def prepared(argv: list[str]):
    """The run as it stands before its first step."""
    with contextlib.ExitStack() as cleanup:
        return prepare(train.config_from_args(argv), cleanup)


@pytest.mark.parametrize("kind", ["run folder", "bare folder"])
def test_the_child_starts_on_the_parents_weights_with_a_fresh_optimizer(
    tiny_run, tmp_path, corpus_files, kind
):
    parent = tiny_run if kind == "run folder" else bare_copy(tiny_run, tmp_path / "bare")
    out = tmp_path / "child"
    run = prepared(child_flags(parent, out, corpus_files))
    weights = load_file(str(parent / "model.safetensors"))
    state = run.model.state_dict()
    assert state.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(state[key], value), key
    assert run.optimizer.state_dict()["state"] == {} and run.state.step == 0
    # The parent's model options, its tokenizer (a copy in the child's folder), no training.
    m, d = run.cfg.model, run.cfg.data
    assert (m.preset, m.hidden_size, m.num_layers, m.num_heads, m.ffn_size) == (
        "tiny",
        32,
        2,
        2,
        64,
    )
    assert (m.max_positions, m.seq_len, m.copy_attention) == (128, 32, True)
    assert (d.source_len, d.target_len, d.vocab_size) == (64, 16, 400)
    assert (out / "tokenizer.json").read_bytes() == (parent / "tokenizer.json").read_bytes()
    # config.json records the parent: its path, the hash of its weights, the option given.
    config = json.loads((out / "config.json").read_text())
    digest = hashlib.sha256((parent / "model.safetensors").read_bytes()).hexdigest()
    assert config["init_from"] == {"path": str(parent.resolve()), "weights_sha256": digest}
    assert config["training"]["run"]["init_from"] == str(parent)
    assert config["hidden_size"] == 32 and config["training"]["run"]["objectives"] != "auto"


def test_options_that_leave_the_weights_as_they_are_may_differ(tiny_run, tmp_path, corpus_files):
    free = ["--dropout", "0.1", "--seq-len", "64", "--attention", "math", "--no-chunked-loss"]
    same = ["--preset", "tiny", "--hidden-size", "32", "--vocab-size", "400", "--copy-attention"]
    cfg = train.config_from_args(child_flags(tiny_run, tmp_path / "c", corpus_files, *free, *same))
    m = cfg.model
    assert (m.dropout, m.seq_len, m.attention, m.chunked_loss) == (0.1, 64, "math", False)
    assert (m.hidden_size, m.num_layers, cfg.data.vocab_size) == (32, 2, 400)


@pytest.mark.parametrize(
    "flags, parents_value",
    [
        (["--hidden-size", "64"], "hidden size is 32"),
        (["--preset", "small"], "preset is tiny"),
        (["--num-layers", "3"], "num layers is 2"),
        (["--num-heads", "4"], "num heads is 2"),
        (["--ffn-size", "128"], "ffn size is 64"),
        (["--max-positions", "256"], "max position embeddings is 128"),
        (["--no-copy-attention"], "copy attention is True"),
        (["--hidden-act", "gelu_tanh"], "hidden act is gelu"),
        (["--vocab-size", "1000"], "vocab size 400"),
        (["--tokenizer-kind", "wordpiece"], "tokenizer kind bpe"),
        (["--tokenizer", "some/tokenizer.json"], "uses the parent's tokenizer"),
    ],
)
def test_a_flag_that_contradicts_the_parent_is_refused_by_name(
    tiny_run, tmp_path, corpus_files, flags, parents_value
):
    with pytest.raises(SystemExit) as refused:
        train.config_from_args(child_flags(tiny_run, tmp_path / "c", corpus_files, *flags))
    message = str(refused.value.code)
    assert "\n" not in message
    assert message.startswith(f"error: {flags[0]}")
    assert " ".join(flags) in message or flags[0] == "--tokenizer"
    assert parents_value in message and str(tiny_run) in message


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_parent_without_its_files_is_a_one_line_error(tiny_run, tmp_path, corpus_files, missing):
    parent = bare_copy(tiny_run, tmp_path / "parent", leave_out=missing)
    with pytest.raises(SystemExit, match=f"error: --init-from {parent}: {missing} is missing"):
        train.main(child_flags(parent, tmp_path / "child", corpus_files))
    with pytest.raises(SystemExit, match="no such folder"):
        train.main(child_flags(tmp_path / "nowhere", tmp_path / "child", corpus_files))


def test_init_from_with_resume_or_into_itself_is_an_error(tiny_run, tmp_path, corpus_files):
    with pytest.raises(SystemExit, match="--init-from starts a new one: not both"):
        train.config_from_args(["--resume", str(tiny_run), "--init-from", str(tiny_run)])
    copy = shutil.copytree(tiny_run, tmp_path / "run")
    with pytest.raises(SystemExit, match="is the --output-dir: the child run needs a folder"):
        train.main(child_flags(copy, copy, corpus_files))


def test_a_config_made_in_code_is_checked_against_the_parent(tiny_run, tmp_path, corpus_files):
    """A TrainConfig made in code has no command line to inherit through: its tokenizer and
    the model its options build are still checked against the parent, before its weights are
    read."""
    cfg = train.config_from_args(child_flags(tiny_run, tmp_path / "a", corpus_files))
    cfg.data.tokenizer = str(tiny_run)
    with pytest.raises(TrainingError, match="--tokenizer and --init-from contradict"):
        train.train(cfg)
    cfg = train.config_from_args(train_flags(tmp_path / "b", corpus_files, "--hidden-size", "64"))
    cfg.run.init_from = str(tiny_run)
    with pytest.raises(TrainingError, match="not the one in .*hidden_size is 32 there, these"):
        train.train(cfg)


# ---------------------------------------------------------------------------- a child's life


@pytest.fixture(scope="module")
def straight_child(tiny_run, tmp_path_factory, corpus_files) -> Path:
    """The child trained without interruption, for the interrupted ones to equal."""
    out = tmp_path_factory.mktemp("child") / "straight"
    train.train(train.config_from_args(child_flags(tiny_run, out, corpus_files, *CHILD_STEPS)))
    return out


def test_the_child_records_its_parent_in_summary_json(straight_child, tiny_run):
    summary = json.loads((straight_child / "summary.json").read_text())
    assert summary["init_from"]["path"] == str(tiny_run.resolve())
    assert summary["steps"] == 12


def test_a_stopped_child_resumes_exactly_without_its_parent(
    tiny_run, tmp_path, corpus_files, straight_child
):
    """SIGTERM at step 6, then --resume once the parent folder is gone: the child continues
    from its own checkpoint and ends as the child never stopped (the parent's record kept)."""
    parent = shutil.copytree(tiny_run, tmp_path / "parent")
    out = tmp_path / "child"
    flags = child_flags(parent, out, corpus_files, *CHILD_STEPS)
    assert run_until_signal(flags, stop_at=6) == 128 + signal.SIGTERM
    assert latest_step(out) == 6
    shutil.rmtree(parent)
    train.train(train.config_from_args(["--resume", str(out)]))
    assert_same_run(straight_child, out)
    recorded = json.loads((straight_child / "config.json").read_text())["init_from"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init_from"]["weights_sha256"] == recorded["weights_sha256"]


def test_a_child_killed_inside_a_save_resumes_to_the_same_run(
    tiny_run, tmp_path, corpus_files, straight_child
):
    """kill -9 while step 8's weights are half written: --resume takes step 4's checkpoint
    and the finished child equals the one never killed."""
    out = tmp_path / "child"
    flags = child_flags(tiny_run, out, corpus_files, *CHILD_STEPS)
    with training_process(flags, tmp_path, "weights", 2) as (proc, ready):
        wait_for(ready.exists, proc.is_alive, what="the freeze in step 8's save")
        sigkill(proc)
    assert assert_loadable_checkpoint(out) == 4
    train.train(train.config_from_args(["--resume", str(out)]))
    assert_same_run(straight_child, out)


@needs_gloo
def test_the_child_under_ddp_and_fsdp_equals_one_process(tiny_run, tmp_path, corpus_files):
    """Two gloo processes (DDP, FSDP2) with half the batch each start from the parent's
    weights, read by every rank before wrapping, and train the one-process child's run."""
    steps = [*STEPS, *LOGS]
    out = {name: tmp_path / name for name in ("one", "ddp", "fsdp")}
    train.train(train.config_from_args(child_flags(tiny_run, out["one"], corpus_files, *steps)))
    half = [*steps, "--batch-size", "4"]
    launch(
        [
            child_flags(tiny_run, out["ddp"], corpus_files, *half),
            child_flags(tiny_run, out["fsdp"], corpus_files, *half, "--strategy", "fsdp"),
        ],
        tmp_path,
    )
    for name in ("ddp", "fsdp"):
        assert_same_distributed_run(out["one"], out[name])
        assert json.loads((out[name] / "config.json").read_text())["init_from"]["path"] == str(
            tiny_run.resolve()
        )
    assert (out["fsdp"] / "checkpoints" / "step-0000006" / "dcp").is_dir()
