"""Data-parallel training on CPU with gloo: two processes give what one process with the global
batch gives (DDP, FSDP, gradient accumulation), and checkpoints move between world sizes.

Two-process runs go through ``torchrun --standalone`` and ``tests/distributed_runner.py``;
reference runs are ``train.train`` in this process. Everything is fp32, so "the same" means
equal to floating-point reordering.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, metrics, train_flags
from safetensors.torch import load_file

import train
from model.transformer import MiniTuringModel
from trainer import distributed
from trainer.errors import TrainingError

RUNNER = ROOT / "tests" / "distributed_runner.py"
STEPS = ["--max-steps", "6", "--save-every", "3", "--keep-checkpoints", "3"]
LOGS = ["--log-every", "1", "--eval-every", "3"]
MLM_ONLY = ["--objectives", "masked_lm=1"]
# Evaluation batches follow the micro-batch, not accumulation: evaluate every held-out example.
FULL_EVAL = ["--eval-batches", "100"]
BUDGET = ["--max-steps", "100000", "--time-budget", "3", "--warmup-steps", "2"]

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def flags(corpus_files, out: Path, *extra: str) -> list[str]:
    return train_flags(out, corpus_files, *STEPS, *LOGS, *extra)


def launch(runs: list[list[str]], workdir: Path, nproc: int = 2) -> None:
    """Run the given train.py command lines in one launch of ``nproc`` processes (no torchrun
    for one process: a plain ``python``, as a user would start it)."""
    spec = workdir / f"runs-{len(list(workdir.glob('runs-*.json')))}.json"
    spec.write_text(json.dumps(runs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run(
        launcher + [str(RUNNER), str(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (
        f"{nproc}-process run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )


def assert_same_run(expected: Path, actual: Path) -> None:
    """Same logged losses and held-out metrics at every step, and the same final weights."""

    def curve(folder: Path) -> list[tuple[int, str, float]]:
        return [
            (m["step"], k, v)
            for m in metrics(folder)
            for k, v in sorted(m.items())
            if k.startswith(("loss/", "eval/", "val/"))
        ]

    a, b = curve(expected), curve(actual)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert any(k.startswith("eval/") for _, k, _ in a) and a[-1][0] == 6
    for (step, key, va), (_, _, vb) in zip(a, b, strict=True):
        assert vb == pytest.approx(va, rel=1e-5, abs=1e-6), (step, key)
    # The same weights kept, for the same reason (the validation samples pair up by example).
    ka, kb = (json.loads((run / "summary.json").read_text())["kept"] for run in (expected, actual))
    assert (kb["step"], kb["why"].split(":")[0]) == (ka["step"], ka["why"].split(":")[0])
    wa = load_file(str(expected / "model.safetensors"))
    wb = load_file(str(actual / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5, msg=key)


def interrupted_copy(run: Path, dest: Path, step: int) -> Path:
    """The run folder as it would be had the run stopped right after its step-``step`` save."""
    shutil.copytree(run, dest)
    name = f"step-{step:07d}"
    for ckpt in (dest / "checkpoints").glob("step-*"):
        if ckpt.name > name:
            shutil.rmtree(ckpt)
    (dest / "checkpoints" / "latest").write_text(name)
    (dest / "model.safetensors").unlink()
    return dest


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_files) -> dict[str, Path]:
    """Every run the tests compare. Starting two processes costs far more than a tiny run, so
    all two-process runs share one launch; the references run in this process first.

    reference     1 process, batch 8, every objective
    ddp, fsdp     2 processes x batch 4, every objective
    fsdp-recompute  the same with activation checkpointing
    accum         1 process, 2 micro-batches of 4, masked LM only
    accum-ddp     2 processes x batch 4, masked LM only
    accum-fsdp    2 processes x 2 micro-batches of 2, masked LM only
    one-to-two    the reference stopped at step 3, resumed by 2 FSDP processes
    budget        2 processes under a time budget of a few seconds
    """
    work = tmp_path_factory.mktemp("distributed")
    out = {name: work / name for name in ("reference", "ddp", "fsdp", "accum")}
    names = ("accum-ddp", "accum-fsdp", "fsdp-recompute", "budget")
    out.update({name: work / name for name in names})
    train.train(train.config_from_args(flags(corpus_files, out["reference"])))
    accum = ["--batch-size", "4", "--grad-accum", "2", *MLM_ONLY, *FULL_EVAL]
    train.train(train.config_from_args(flags(corpus_files, out["accum"], *accum)))
    out["one-to-two"] = interrupted_copy(out["reference"], work / "one-to-two", step=3)
    launch(
        [
            flags(corpus_files, out["ddp"], "--batch-size", "4"),
            flags(corpus_files, out["fsdp"], "--batch-size", "4", "--strategy", "fsdp"),
            flags(
                corpus_files,
                out["fsdp-recompute"],
                *["--batch-size", "4", "--strategy", "fsdp", "--activation-checkpointing"],
            ),
            flags(corpus_files, out["accum-ddp"], "--batch-size", "4", *MLM_ONLY, *FULL_EVAL),
            flags(
                corpus_files,
                out["accum-fsdp"],
                *["--batch-size", "2", "--grad-accum", "2", "--strategy", "fsdp"],
                *MLM_ONLY,
                *FULL_EVAL,
            ),
            ["--resume", str(out["one-to-two"]), "--strategy", "fsdp", "--batch-size", "4"],
            flags(corpus_files, out["budget"], "--batch-size", "4", *MLM_ONLY, *BUDGET),
        ],
        work,
    )
    return out


def test_ddp_two_processes_match_one_with_the_global_batch(runs):
    assert_same_run(runs["reference"], runs["ddp"])
    # Both consumed the same examples of every objective: sharding neither skips nor repeats.
    for step in ("step-0000003", "step-0000006"):
        state = [
            json.loads((runs[r] / "checkpoints" / step / "state.json").read_text())["data"]
            for r in ("reference", "ddp")
        ]
        assert state[0] == state[1]
    # A replicated model is checkpointed by rank 0 in the single-process format.
    assert (runs["ddp"] / "checkpoints" / "step-0000006" / "optimizer.pt").is_file()


def test_fsdp_two_processes_match_one_and_export_plain_weights(runs):
    assert_same_run(runs["reference"], runs["fsdp"])
    ckpt = runs["fsdp"] / "checkpoints" / "step-0000006"
    # Sharded checkpoint: one file of shards per rank, no full copy of the model inside it.
    assert (ckpt / "dcp" / ".metadata").is_file()
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    assert not (ckpt / "model.safetensors").exists()
    # The inference export is a plain full state dict that loads on one CPU.
    import model as api

    lm = api.load(runs["fsdp"])
    assert not any(type(p).__name__ == "DTensor" for p in lm.model.parameters())
    assert lm.fill_mask("The [MASK] is here.", top_k=2)


def test_activation_checkpointing_under_fsdp_changes_nothing_but_memory(runs):
    assert_same_run(runs["reference"], runs["fsdp-recompute"])


def test_accumulation_equals_more_processes(runs):
    """One process accumulating 2 micro-batches of 4 = two processes with 4 each (DDP) = two
    processes accumulating 2 micro-batches of 2 (FSDP, reduce-scatter skipped on the first).
    One objective, since each micro-batch draws its own objective from the mixture."""
    assert_same_run(runs["accum"], runs["accum-ddp"])
    assert_same_run(runs["accum"], runs["accum-fsdp"])


def test_resume_across_world_sizes(runs, tmp_path):
    """A sharded 2-rank checkpoint resumed by one plain process, and a 1-process checkpoint
    resumed by two FSDP ranks: both continue the uninterrupted run's curve and end on its
    weights. The global batch (micro-batch x processes) is kept at 8, as a user must."""
    two_to_one = interrupted_copy(runs["fsdp"], tmp_path / "two-to-one", step=3)
    resume = ["--resume", str(two_to_one), "--strategy", "auto", "--batch-size", "8"]
    train.train(train.config_from_args(resume))
    assert_same_run(runs["reference"], two_to_one)
    assert (two_to_one / "checkpoints" / "step-0000006" / "optimizer.pt").is_file()

    assert_same_run(runs["reference"], runs["one-to-two"])
    assert (runs["one-to-two"] / "checkpoints" / "step-0000006" / "dcp").is_dir()


def test_time_budget_stops_every_process_at_the_same_step(runs):
    """Each process has its own clock; the step count fitted to the budget and the moment it is
    spent are rank 0's on all of them (otherwise the run would hang, not finish)."""
    folder = runs["budget"]
    latest = (folder / "checkpoints" / "latest").read_text().strip()
    state = json.loads((folder / "checkpoints" / latest / "state.json").read_text())
    assert 20 <= state["step"] <= state["planned_steps"] < 100000
    assert metrics(folder)[-1]["step"] == state["step"]


def test_sharded_checkpoint_reshards_for_fsdp_on_one_process(runs, tmp_path):
    """torch.distributed.checkpoint written by 2 FSDP ranks, read by FSDP on 1 (a one-member
    process group, started without torchrun)."""
    resumed = interrupted_copy(runs["fsdp"], tmp_path / "fsdp-two-to-one", step=3)
    launch([["--resume", str(resumed), "--batch-size", "8"]], tmp_path, nproc=1)
    assert_same_run(runs["reference"], resumed)
    assert (resumed / "checkpoints" / "step-0000006" / "dcp").is_dir()


def test_streamed_run_under_two_processes_resumes_exactly(tmp_path, corpus_files):
    """--streaming under torchrun: each process reads its own part of the stream, and a run
    stopped after its step-3 save and resumed by two processes equals the run never stopped."""
    text_file, _ = corpus_files
    stream = ["--train-text", str(text_file), "--streaming", "--objectives", "masked_lm=1"]
    straight = tmp_path / "straight"
    run = [*TINY_FLAGS, *stream, *STEPS, *LOGS, "--batch-size", "4"]
    launch([[*run, "--output-dir", str(straight)]], tmp_path)
    resumed = interrupted_copy(straight, tmp_path / "resumed", step=3)
    launch([["--resume", str(resumed)]], tmp_path)
    assert_same_run(straight, resumed)


def test_unknown_strategy_is_a_clear_error(tmp_path, corpus_files):
    with pytest.raises(TrainingError, match="--strategy must be auto, ddp or fsdp"):
        train.train(train.config_from_args(flags(corpus_files, tmp_path, "--strategy", "zero3")))


def test_activation_checkpointing_keeps_only_block_inputs(tiny_config):
    """With recomputation, the forward pass saves far fewer tensors for backward, and the
    gradients are the same."""
    env = distributed.Env(torch.device("cpu"), None)
    ids = torch.randint(6, tiny_config.vocab_size, (2, 16))
    labels = torch.where(torch.rand(2, 16) < 0.5, ids, -100)

    def run(recompute: bool) -> tuple[int, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = distributed.wrap_model(
            MiniTuringModel(tiny_config), env, activation_checkpointing=recompute
        )
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return len(saved), [p.grad for p in model.parameters()]

    plain_saved, plain_grads = run(False)
    recomputed_saved, recomputed_grads = run(True)
    assert recomputed_saved < plain_saved / 2, (recomputed_saved, plain_saved)
    for a, b in zip(plain_grads, recomputed_grads, strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_bf16_on_one_gpu_learns_and_exports(tmp_path, corpus_files):
    """FSDP with the bf16 policy, activation checkpointing and accumulation on one GPU: loss
    falls, and the export loads on the CPU."""
    out = tmp_path / "gpu"
    extra = ["--device", "cuda", "--precision", "bf16", "--strategy", "fsdp"]
    extra += ["--activation-checkpointing", "--grad-accum", "2", "--max-steps", "30"]
    extra += ["--lr", "3e-3", "--log-every", "5"]
    launch([flags(corpus_files, out, *extra, *MLM_ONLY)], tmp_path, nproc=1)
    curve = [m["loss/masked_lm"] for m in metrics(out) if "loss/masked_lm" in m]
    assert curve[-1] < curve[0] - 0.5, curve
    import model as api

    assert api.load(out).fill_mask("The [MASK] is here.", top_k=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_blocks_match_eager_on_gpu(tmp_path, corpus_files):
    """--compile (Triton kernels per block) trains like eager mode, to fp32 kernel tolerance."""
    pytest.importorskip("triton")
    cuda = ["--device", "cuda", "--max-steps", "4", "--save-every", "0", *MLM_ONLY]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        train.train(train.config_from_args(flags(corpus_files, tmp_path / name, *cuda, *extra)))
    eager, compiled = (
        [m["loss/masked_lm"] for m in metrics(tmp_path / name) if "loss/masked_lm" in m]
        for name in ("eager", "compiled")
    )
    assert len(eager) == 4 and compiled == pytest.approx(eager, rel=2e-3)
