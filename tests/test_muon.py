"""--optimizer muon: torch.optim.Muon for the blocks' weight matrices, AdamW for the rest. Which
parameters each trains, that the schedule drives both, that a run learns, resumes bitwise, and
trains under DDP and FSDP2 (two gloo processes) what one process trains.

Muon orthogonalises in bf16 whatever the run's precision, and its Newton-Schulz iteration
magnifies rounding in the matrix's small directions: two processes, whose gradients differ
from one process's by fp32 reordering (and, under FSDP2, whose products are summed across
shards), match one process to a looser tolerance than AdamW's runs do. A resumed run, the same
computation in the same order, matches bitwise.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import latest_step, metrics, train_flags
from safetensors.torch import load_file
from test_distributed import LOGS, STEPS, interrupted_copy, launch
from test_resume import run_until_signal

import train
from model.transformer import MiniTuringModel
from trainer.config import OptimConfig
from trainer.errors import TrainingError
from trainer.optim import MuonAdamW, lr_at, make_optimizer, muon_parameters

MUON = ["--optimizer", "muon"]
# The tolerance of a multi-process Muon run against one process (see the module's doc).
REL, ABS = 2e-3, 1e-4
# Every held-out example; no validation split, so model.safetensors is the last weights.
EVAL = ["--eval-batches", "100", "--val-fraction", "0"]

pytestmark = pytest.mark.usefixtures("without_plot")


def named_groups(model: torch.nn.Module, optimizer: MuonAdamW) -> list[tuple[str, list[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (type(part).__name__, [names[id(p)] for p in group["params"]])
        for part in optimizer.parts
        for group in part.param_groups
    ]


def test_muon_trains_the_block_matrices_but_qkv_and_nothing_else(tiny_config):
    tiny_config.copy_attention = True  # the copy gate is there, and must go to AdamW
    model = MiniTuringModel(tiny_config)
    optimizer = make_optimizer(model, OptimConfig(optimizer="muon", weight_decay=0.05))
    assert isinstance(optimizer, MuonAdamW)
    (muon, matrices), (_, decayed), (_, not_decayed) = named_groups(model, optimizer)
    layers = range(tiny_config.num_layers)
    assert muon == "Muon"
    assert sorted(matrices) == sorted(
        f"blocks.{i}.{m}.weight" for i in layers for m in ("attn.out", "ffn.up", "ffn.down")
    )  # fmt: skip
    assert matrices == muon_parameters(model)
    # The fused q/k/v matrix goes to AdamW (orthogonalised whole, it stalled training).
    assert sorted(decayed) == sorted(
        ["copy_gate.weight", *(f"blocks.{i}.attn.qkv.weight" for i in layers)]
    )
    assert {"embed.weight", "position.weight", "ln_f.weight", "ln_f.bias", "copy_gate.bias",
            "blocks.0.ln1.weight", "blocks.0.attn.qkv.bias", "blocks.1.ffn.down.bias"} <= set(
        not_decayed
    )  # fmt: skip
    assert not any(n.endswith("weight") and "blocks" in n and "ln" not in n for n in not_decayed)
    # Every parameter exactly once; the output layer is the (tied) token embedding.
    every = matrices + decayed + not_decayed
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())
    groups = optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.05, 0.0]
    assert groups[0]["adjust_lr_fn"] == "match_rms_adamw"


def test_adamw_stays_the_default_and_one_optimizer(tiny_config):
    assert OptimConfig().optimizer == "adamw"
    optimizer = make_optimizer(MiniTuringModel(tiny_config), OptimConfig())
    assert type(optimizer) is torch.optim.AdamW


def test_the_rate_scales_muons_step_too(tiny_config):
    """One step from the same weights and gradients: Muon's change of a matrix (its update and
    its decay) is proportional to the rate the loop sets, as AdamW's is."""
    torch.manual_seed(0)
    base = MiniTuringModel(tiny_config)
    ids = torch.randint(6, tiny_config.vocab_size, (2, 16))
    labels = torch.where(torch.rand(2, 16) < 0.5, ids, -100)
    changes = []
    for lr in (1e-3, 2e-3, 0.0):
        model = MiniTuringModel(tiny_config)
        model.load_state_dict(base.state_dict())
        optimizer = make_optimizer(model, OptimConfig(optimizer="muon"))
        for group in optimizer.param_groups:  # as the loop's train_step does
            group["lr"] = lr
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        changes.append(model.blocks[0].attn.out.weight - base.blocks[0].attn.out.weight)
    assert changes[0].abs().max() > 0
    torch.testing.assert_close(changes[1], 2 * changes[0], rtol=1e-3, atol=1e-7)
    assert not changes[2].any()


def test_the_schedule_drives_both_optimizers(tmp_path, corpus_files, monkeypatch):
    """Every step, each parameter group (Muon's and AdamW's two) has the schedule's rate."""
    seen = []
    real = MuonAdamW.step

    def step(self):
        seen.append([g["lr"] for g in self.param_groups])
        real(self)

    monkeypatch.setattr(MuonAdamW, "step", step)
    out = tmp_path / "run"
    argv = train_flags(out, corpus_files, *MUON, "--max-steps", "20", "--warmup-steps", "4")
    cfg = train.config_from_args(argv)
    train.train(cfg)
    expected = [lr_at(s, 20, cfg.optim) for s in range(20)]
    assert seen == [[lr] * 3 for lr in expected]
    assert expected[0] < expected[5] == cfg.optim.lr > expected[-1]  # warm-up, peak, decay


def test_a_tiny_muon_run_learns_and_records_its_optimizer(tmp_path, corpus_files):
    out = tmp_path / "run"
    flags = [
        "--max-steps",
        "40",
        "--lr",
        "3e-3",
        "--log-every",
        "10",
        "--objectives",
        "masked_lm=1",
    ]
    train.train(train.config_from_args(train_flags(out, corpus_files, *MUON, *flags)))
    curve = [m["loss/masked_lm"] for m in metrics(out) if "loss/masked_lm" in m]
    assert curve[-1] < curve[0] - 0.5, curve
    assert json.loads((out / "summary.json").read_text())["optimizer"] == "muon"
    assert json.loads((out / "config.json").read_text())["training"]["optim"]["optimizer"] == "muon"
    optimizer = torch.load(out / "checkpoints" / "step-0000040" / "optimizer.pt")
    assert len(optimizer["param_groups"]) == 3
    assert "momentum_buffer" in optimizer["state"][0]  # Muon's, numbered first
    assert "exp_avg" in optimizer["state"][len(optimizer["param_groups"][0]["params"])]


@pytest.mark.parametrize("stop_at", [1, 7])
def test_a_stopped_muon_run_resumes_bitwise(tmp_path, corpus_files, stop_at):
    """SIGTERM during step ``stop_at``, then --resume: the same losses, gradient norms and
    final weights, bit for bit, as the run never stopped (dropout on: the RNG travels too)."""
    extra = [*MUON, "--max-steps", "12", "--log-every", "1", "--dropout", "0.1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train.train(train.config_from_args(train_flags(straight, corpus_files, *extra)))
    status = run_until_signal(train_flags(stopped, corpus_files, *extra), stop_at)
    assert status == 128 + signal.SIGTERM and latest_step(stopped) == stop_at
    train.train(train.config_from_args(["--resume", str(stopped)]))
    assert latest_step(stopped) == 12
    lines = [[m for m in metrics(run) if "lr" in m] for run in (straight, stopped)]
    assert [sorted(m.items()) for m in lines[0]] == [
        sorted({**m, "elapsed": a["elapsed"], "tokens_per_s": a["tokens_per_s"],
                "data_wait": a["data_wait"]}.items())
        for a, m in zip(lines[0], lines[1], strict=True)
    ]  # fmt: skip
    wa, wb = (load_file(str(run / "model.safetensors")) for run in (straight, stopped))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (torch.load(run / "checkpoints" / "step-0000012" / "optimizer.pt")
              for run in (straight, stopped))  # fmt: skip
    assert oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        assert all(torch.equal(v, ob["state"][i][k]) for k, v in state.items())


def test_resuming_with_another_optimizer_is_refused(tmp_path, corpus_files):
    out = tmp_path / "run"
    train.train(train.config_from_args(train_flags(out, corpus_files, "--max-steps", "2")))
    with pytest.raises(TrainingError, match="trained with --optimizer adamw"):
        train.train(train.config_from_args(["--resume", str(out), *MUON, "--max-steps", "4"]))


def test_unknown_optimizer_is_refused(tmp_path, corpus_files):
    with pytest.raises(TrainingError, match="--optimizer must be one of adamw, muon"):
        train.train(
            train.config_from_args(train_flags(tmp_path, corpus_files, "--optimizer", "sgd"))
        )


# ---------------------------------------------------------------------------- two processes


def assert_close_run(expected: Path, actual: Path) -> None:
    """The same steps logged with close losses and gradient norms, and close final weights."""

    def curve(folder: Path) -> list[tuple[int, str, float]]:
        return [
            (m["step"], k, v)
            for m in metrics(folder)
            for k, v in sorted(m.items())
            if k.startswith(("loss/", "eval/", "grad_norm"))
        ]

    a, b = curve(expected), curve(actual)
    assert [x[:2] for x in a] == [x[:2] for x in b] and a[-1][0] == 6
    for (step, key, va), (_, _, vb) in zip(a, b, strict=True):
        assert vb == pytest.approx(va, rel=REL, abs=ABS), (step, key)
    wa = load_file(str(expected / "model.safetensors"))
    wb = load_file(str(actual / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=REL, atol=ABS, msg=key)


needs_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_files) -> dict[str, Path]:
    """reference   1 process, batch 8, Muon
    ddp, fsdp      2 processes x batch 4, Muon
    one-to-two     the reference stopped at step 3, resumed by 2 FSDP processes
    One launch of two processes runs the last three (starting them costs more than a run)."""
    work = tmp_path_factory.mktemp("muon")
    out = {name: work / name for name in ("reference", "ddp", "fsdp")}

    def flags(folder: Path, *extra: str) -> list[str]:
        return train_flags(folder, corpus_files, *MUON, *STEPS, *LOGS, *EVAL, *extra)

    train.train(train.config_from_args(flags(out["reference"])))
    out["one-to-two"] = interrupted_copy(out["reference"], work / "one-to-two", step=3)
    launch(
        [
            flags(out["ddp"], "--batch-size", "4"),
            flags(out["fsdp"], "--batch-size", "4", "--strategy", "fsdp"),
            ["--resume", str(out["one-to-two"]), "--strategy", "fsdp", "--batch-size", "4"],
        ],
        work,
    )
    return out


@needs_gloo
def test_ddp_with_muon_matches_one_process(runs):
    assert_close_run(runs["reference"], runs["ddp"])


@needs_gloo
def test_fsdp_with_muon_matches_one_process_with_sharded_state(runs):
    assert_close_run(runs["reference"], runs["fsdp"])
    ckpt = runs["fsdp"] / "checkpoints" / "step-0000006"
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2  # the momentum sharded with the rest
    assert not (ckpt / "optimizer.pt").exists()


@needs_gloo
def test_muon_resumes_across_world_sizes(runs, tmp_path):
    """The 2-rank sharded checkpoint (Muon's momentum and AdamW's moments as DTensor shards)
    resumed by one process, and the 1-process checkpoint resumed by two FSDP ranks, both
    continue the uninterrupted run."""
    two_to_one = interrupted_copy(runs["fsdp"], tmp_path / "two-to-one", step=3)
    train.train(train.config_from_args(["--resume", str(two_to_one), "--strategy", "auto",
                                        "--batch-size", "8"]))  # fmt: skip
    assert_close_run(runs["reference"], two_to_one)
    assert_close_run(runs["reference"], runs["one-to-two"])
