"""One lever at a time: our training step with each speed option flipped, in one process.

    python -m bench.levers                        # masked LM and summarization, every lever
    python -m bench.levers --objectives summarize --rounds 5

``compare.py`` races whole trainers; this isolates *why* ours is fast. Every lever is a train.py
flag (see ``python train.py --help``): each variant is the defaults plus its flags, turned into
the model, optimizer, precision and batch padding by the trainer's own config
(``build_model_config``, ``make_optimizer``). It times a full training step (forward, backward,
optimizer) on synthetic batches of the two training shapes (masked LM: packed blocks, 15%
labelled; summarization: one length bucket of sources, full targets, prefix-LM), fresh ones every
round. Variants run round-robin, ``--rounds`` times, each round led by the next variant, so a
machine whose speed drifts slows all alike; a variant's tokens over its seconds, over all rounds,
is reported with its speed relative to the defaults. ``--variants compiled`` adds
``--compile`` (each block under ``torch.compile``), a lever that is off by default; ``--variants
"dropout 0.1"`` and ``"residual dropout 0.1"`` time what dropout costs a step (everywhere, or on
embeddings and residual branches only).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as np
import torch

import train
from data.batching import Seq2SeqStream
from model.constants import IGNORE_INDEX
from model.tokenizer import SpecialIds
from model.transformer import MiniTuringModel
from trainer.config import build_model_config
from trainer.optim import make_optimizer

VARIANTS = {
    "defaults": [],
    "pad to longest": ["--pad-multiple", "1"],  # summarization only
    "sdpa attention": ["--attention", "sdpa"],
    "math attention": ["--attention", "math"],
    "tanh gelu": ["--hidden-act", "gelu_tanh"],
    "every position": ["--no-sparse-outputs"],
    "whole logits": ["--no-chunked-loss"],
    "fp32": ["--precision", "fp32"],
    "default adamw": ["--no-fused-adamw"],
}
OPT_IN = {
    "compiled": ["--compile"],
    "dropout 0.1": ["--dropout", "0.1"],
    "residual dropout 0.1": ["--dropout", "0.1", "--attention-dropout", "0"],
}
IDS = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, sentence_mask=5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.levers",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--objectives", default="masked_lm,summarize", help="comma list")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {[*VARIANTS, *OPT_IN]}")
    p.add_argument("--rounds", type=int, default=5, help="round-robin passes over the variants")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="the defaults'")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128, help="masked-LM block")
    p.add_argument("--source-len", type=int, default=256)
    p.add_argument("--target-len", type=int, default=32)
    for name, value in (("hidden-size", 256), ("num-layers", 4), ("num-heads", 4),
                        ("ffn-size", 1024), ("vocab-size", 8192)):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=value)
    p.add_argument("--seed", type=int, default=0)
    return p


class Contestant:
    """Our model, optimizer, precision and padding as train.py builds them from these flags."""

    def __init__(self, args: argparse.Namespace, flags: list[str]) -> None:
        shape = ["hidden_size", "num_layers", "num_heads", "ffn_size", "seq_len", "vocab_size"]
        shape += ["source_len", "target_len", "batch_size", "precision"]
        base = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in shape]
        positions = max(args.seq_len, args.source_len + args.target_len)
        self.cfg = cfg = train.config_from_args([*base, f"--max-positions={positions}", *flags])
        torch.manual_seed(args.seed)
        self.model = MiniTuringModel(build_model_config(cfg)).train()
        if cfg.run.compile:
            for block in self.model.blocks:
                block.compile()
        self.optimizer = make_optimizer(self.model, cfg.optim)

    def steps(self, batches: list[dict]) -> float:
        """Seconds for these training steps."""
        bf16 = self.cfg.run.precision == "bf16"
        start = time.perf_counter()
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = self.model(**batch).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def batches(self, objective: str, longest: list[int], seed: int) -> list[dict]:
        """Synthetic batches with the token counts, masks and label layout of the real ones;
        summarization: one per entry of ``longest`` (the bucket's longest source), padded by
        our own stream (``--pad-multiple``)."""
        gen = np.random.default_rng(seed)
        cfg, vocab, b, out = self.cfg, self.cfg.data.vocab_size, self.cfg.optim.batch_size, []
        for top in longest:
            if objective == "masked_lm":
                ids = torch.from_numpy(gen.integers(6, vocab, (b, cfg.model.seq_len)))
                chosen = torch.from_numpy(gen.random((b, cfg.model.seq_len)) < 0.15)
                out.append({"input_ids": ids, "labels": torch.where(chosen, ids, IGNORE_INDEX)})
                continue
            sizes = [top, *gen.integers(max(top - 7, 1), top + 1, b - 1)]
            sources = [gen.integers(6, vocab, n) for n in sizes]
            targets = [gen.integers(6, vocab, cfg.data.target_len) for _ in sizes]
            stream = Seq2SeqStream("summarize", sources, targets, IDS, source_len=cfg.data.source_len,
                                   target_len=cfg.data.target_len, pad_multiple=cfg.data.pad_multiple)  # fmt: skip
            batch = stream.batch(np.arange(b), np.arange(b), seed)
            out.append({k: torch.from_numpy(v) for k, v in batch.items()})
        return out


def tokens(batch: dict) -> int:
    """Real tokens of a batch (padding excluded)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def run(args: argparse.Namespace) -> list[dict]:
    levers = {**VARIANTS, **OPT_IN}
    objectives = [x.strip() for x in args.objectives.split(",") if x.strip()]
    variants = ["defaults"] + [
        v.strip() for v in args.variants.split(",") if v.strip() != "defaults"
    ]
    unknown = [v for v in variants if v not in levers]
    unknown += [o for o in objectives if o not in ("masked_lm", "summarize")]
    if unknown or not objectives:
        raise SystemExit(f"error: unknown objective or variant {unknown}; see --help")
    if min(args.rounds, args.steps, args.batch_size) < 1:
        raise SystemExit("error: --rounds, --steps and --batch-size must be >= 1")
    shortest = min(96, args.source_len - 2)
    # Every source length once, in a fixed random order: no two batches share a length, so an
    # unpadded batch always has a shape the kernels have not seen.
    fresh = shortest + np.random.default_rng(args.seed).permutation(args.source_len - 1 - shortest)
    rows = []
    for objective in objectives:
        chosen = [v for v in variants if objective == "summarize" or v != "pad to longest"]
        contestants = {v: Contestant(args, levers[v]) for v in chosen}
        # Warm-up, as after a run's first minutes: every padded shape once (compiled: every
        # shape compiled before timing), then a step each for the allocator and optimizer.
        every_shape = list(range(shortest, args.source_len - 1, 16))
        for v in ("defaults", "compiled"):
            if v in contestants:
                contestants[v].steps(contestants[v].batches(objective, every_shape, 10**6))
        for c in contestants.values():
            c.steps(c.batches(objective, [args.source_len - 2], 10**6 + 1))
        seconds, counts = dict.fromkeys(chosen, 0.0), dict.fromkeys(chosen, 0)
        for r in range(args.rounds):
            longest = [int(fresh[(r * args.steps + i) % len(fresh)]) for i in range(args.steps)]
            shift = r % len(chosen)  # each variant leads a round in turn
            for v in chosen[shift:] + chosen[:shift]:
                work = contestants[v].batches(objective, longest, r)
                seconds[v] += contestants[v].steps(work)
                counts[v] += sum(tokens(b) for b in work)
        base = counts["defaults"] / seconds["defaults"]
        for v in chosen:
            speed = counts[v] / seconds[v]
            rows.append({"objective": objective, "variant": v, "flags": " ".join(levers[v]),
                         "tokens_per_s": speed, "vs_defaults": speed / base})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.num_layers} x "
          f"{args.hidden_size}, batch {args.batch_size}, defaults in {args.precision}; "
          f"{args.rounds} rounds of {args.steps} steps, variants interleaved", flush=True)  # fmt: skip
    rows = run(args)
    print(
        f"\n{'objective':<10}  {'variant':<15}  {'train.py flags':<26}  {'tokens/s':>9}  vs defaults"
    )
    for r in rows:
        print(f"{r['objective']:<10}  {r['variant']:<15}  {r['flags']:<26}  "
              f"{r['tokens_per_s']:>9,.0f}  {r['vs_defaults']:>10.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
