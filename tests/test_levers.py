"""The speed levers are config options that change speed only: with each one on or off, a
training step's loss and gradients (and, for the optimizer, the updated weights) are equal to
fp32 tolerance, and each is a train.py flag that reaches the model or the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.batching import Seq2SeqStream
from model.config import MiniTuringConfig
from model.constants import IGNORE_INDEX
from model.tokenizer import SpecialIds
from model.transformer import MiniTuringModel
from trainer.config import OptimConfig
from trainer.optim import make_optimizer

SHAPE = dict(
    vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, ffn_size=64,
    max_position_embeddings=64, tokenizer_size=100,
)  # fmt: skip
IDS = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, sentence_mask=5)


def batch(prefix_lm: bool) -> dict:
    """Masked-LM-like (a few labels a row, one row without) or prefix-LM with padding."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(6, 100, (3, 30), generator=gen)
    labels = torch.full_like(x, IGNORE_INDEX)
    if not prefix_lm:
        labels[0, [2, 7]] = 11
        labels[2, [0, 5, 9, 13]] = 12
        return {"input_ids": x, "labels": labels}
    padding = torch.ones_like(x)
    padding[1, 25:] = 0
    prefix = torch.tensor([22, 15, 26])
    for row, p in enumerate(prefix.tolist()):
        end = int(padding[row].sum())
        labels[row, p - 1 : end] = x[row, p - 1 : end]
    return {"input_ids": x, "attention_mask": padding, "prefix_lengths": prefix, "labels": labels}


def loss_and_grads(inputs: dict, **options):
    torch.manual_seed(0)
    model = MiniTuringModel(MiniTuringConfig(**SHAPE, **options)).train()
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("prefix_lm", [False, True])
@pytest.mark.parametrize(
    "option",
    [
        {"attention": "sdpa"},
        {"attention": "math"},
        {"sparse_outputs": False},
        {"chunked_loss": False},
        {"attention": "sdpa", "sparse_outputs": False, "chunked_loss": False},
    ],
)
def test_model_levers_change_speed_only(option, prefix_lm, short_rows):
    inputs = batch(prefix_lm)
    loss, grads = loss_and_grads(inputs)
    other_loss, other_grads = loss_and_grads(inputs, **option)
    torch.testing.assert_close(loss, other_loss)
    for a, b in zip(grads, other_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_math_attention_under_bf16_autocast_matches_sdpa_within_bf16():
    inputs = batch(prefix_lm=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa, _ = loss_and_grads(inputs, attention="sdpa")
        math, _ = loss_and_grads(inputs, attention="math")
    torch.testing.assert_close(sdpa, math, atol=0.05, rtol=0.02)


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention"):
        MiniTuringConfig(**SHAPE, attention="flash")


def test_fused_adamw_changes_speed_only():
    """One optimizer step from the same weights and gradients, fused and not."""
    weights = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = MiniTuringModel(MiniTuringConfig(**SHAPE)).train()
        optimizer = make_optimizer(model, OptimConfig(lr=1e-2, fused_adamw=fused))
        assert optimizer.defaults["fused"] is (True if fused else None)
        for _ in range(2):
            model(**batch(prefix_lm=True)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b)


def test_pad_multiple_changes_speed_only():
    rng = np.random.default_rng(0)
    sources = [rng.integers(6, 100, size=n) for n in (5, 17, 11)]
    targets = [rng.integers(6, 100, size=n) for n in (4, 6, 2)]
    results = []
    for multiple in (1, 16):
        stream = Seq2SeqStream(
            "summarize", sources, targets, IDS, source_len=24, target_len=8, pad_multiple=multiple
        )
        b = {k: torch.from_numpy(v) for k, v in stream.batch(np.arange(3), None, 0).items()}
        assert b["input_ids"].shape[1] == (25 if multiple == 1 else 32)
        results.append(loss_and_grads(b))
    (loss, grads), (other_loss, other_grads) = results
    torch.testing.assert_close(loss, other_loss)
    for a, b in zip(grads, other_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_levers_are_train_py_flags(tokenizer):
    import train
    from trainer.config import build_model_config

    default = train.config_from_args([])
    assert default.model.attention == "auto" and default.optim.fused_adamw
    assert default.model.sparse_outputs and default.model.chunked_loss
    assert default.data.pad_multiple == 64
    cfg = train.config_from_args(
        "--attention math --no-sparse-outputs --no-chunked-loss --no-fused-adamw "
        "--pad-multiple 1".split()
    )
    assert not cfg.optim.fused_adamw and cfg.data.pad_multiple == 1
    config = build_model_config(cfg, tokenizer)
    assert (config.attention, config.sparse_outputs, config.chunked_loss) == ("math", False, False)
    help_text = train.build_parser().format_help()
    for flag in ("--attention", "--sparse-outputs", "--chunked-loss", "--fused-adamw"):
        assert flag in help_text
