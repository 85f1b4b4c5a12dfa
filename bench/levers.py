"""One lever at a time: our training step with each speed choice switched back, in one process.

    python bench/levers.py                        # masked LM and summarization, every lever
    python bench/levers.py --objectives summarize --rounds 5

``compare.py`` races whole trainers; this isolates *why* ours is fast. It builds our model at
the benchmark's shape, makes synthetic batches of the two training shapes (masked LM: 32 packed
blocks of 128 tokens, 15% labelled; summarization: 32 rows of a 96 to 256-token source, all
within a few tokens of each other as length buckets leave them, and a 32-token target,
prefix-LM mask), fresh ones every round, and times a
full training step (forward, backward, fused AdamW) for the current defaults and for each
variant that undoes one lever:

* ``exact lengths`` (summarization): batches padded to their longest example instead of a
  multiple of 16 positions, so most batches have a shape the matrix kernels have not seen;

* ``sdpa attention``: PyTorch's fused attention in training too (the default on CPU in bf16 is
  two batched matmuls and a softmax, see ``model/transformer.py``);
* ``tanh gelu``: the tanh approximation of GELU instead of the exact one;
* ``every position``: the last block computes queries and feed-forward at every position, not
  only where the loss reads;
* ``whole logits``: the loss from all the logits at once in fp32 (``F.cross_entropy``), not
  chunk by chunk with the gradients taken in the forward pass (``linear_cross_entropy``);
* ``fp32``: no bf16 autocast;
* ``default adamw``: ``torch.optim.AdamW`` as constructed without options, instead of the fused
  kernel;
* ``compiled`` (only when asked for: ``--variants compiled``): each block under
  ``torch.compile``, as ``train.py --compile`` does; a lever that is not on by default.

Variants run round-robin, ``--rounds`` times, each round led by the next variant, so a machine
whose speed drifts slows all of them alike; each variant's tokens over its seconds, summed over
the rounds, is reported with its speed relative to the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model.transformer as transformer  # noqa: E402
from data.batching import PAD_MULTIPLE  # noqa: E402
from data.objectives.summarize import build_example, collate  # noqa: E402
from model.config import MiniTuringConfig  # noqa: E402
from model.transformer import IGNORE_INDEX, MiniTuringModel  # noqa: E402

VARIANTS = (
    "defaults",
    "exact lengths",
    "sdpa attention",
    "tanh gelu",
    "every position",
    "whole logits",
    "fp32",
    "default adamw",
)
OPT_IN = ("compiled",)
# Variants that swap one function of model/transformer.py for the plain way.
UNDONE_IN_MODEL = {
    "sdpa attention": ("_math_attention_is_faster", lambda q, k: False),
    "every position": ("labelled_positions", lambda selected: (None, selected)),
    "whole logits": (
        "linear_cross_entropy",
        lambda h, weight, targets: F.cross_entropy(
            F.linear(h, weight).float(), targets, reduction="sum"
        ),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/levers.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--objectives", default="masked_lm,summarize", help="comma list")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS + OPT_IN}"
    )
    p.add_argument("--rounds", type=int, default=5, help="round-robin passes over the variants")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128, help="masked-LM block")
    p.add_argument("--source-len", type=int, default=256)
    p.add_argument("--target-len", type=int, default=32)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--ffn-size", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    return p


def make_batches(
    args: argparse.Namespace, objective: str, longest: list[int], multiple: int, seed: int
) -> list[dict]:
    """Synthetic batches with the token counts, masks and label layout of the real ones, one per
    entry of ``longest`` (the batch's longest prefix, [CLS] source [SEP]; summarization only),
    summarization rows padded to a multiple of ``multiple`` positions."""
    gen = torch.Generator().manual_seed(seed)
    vocab, b = args.vocab_size, args.batch_size
    batches = []
    for top in longest:
        if objective == "masked_lm":
            ids = torch.randint(6, vocab, (b, args.seq_len), generator=gen)
            chosen = torch.rand(b, args.seq_len, generator=gen) < 0.15
            batches.append({"input_ids": ids, "labels": torch.where(chosen, ids, IGNORE_INDEX)})
            continue
        # One length bucket: sources within a few tokens of each other, full targets, framed
        # and padded by the same functions as the real batches.
        source = torch.randint(max(top - 7, 3), top + 1, (b,), generator=gen)
        source[0] = top
        examples = [
            build_example(
                torch.randint(6, vocab, (p - 2,), generator=gen).numpy(),
                torch.randint(6, vocab, (args.target_len - 1,), generator=gen).numpy(),
                cls_id=1,
                sep_id=2,
                source_len=args.source_len,
                target_len=args.target_len,
            )
            for p in source.tolist()
        ]
        limit = args.source_len + args.target_len
        batch = collate(examples, 0, multiple=multiple, limit=limit)
        batches.append({k: torch.from_numpy(v) for k, v in batch.items()})
    return batches


class Contestant:
    """Our model and optimizer with one lever undone (or none, for the defaults)."""

    def __init__(self, args: argparse.Namespace, variant: str, positions: int) -> None:
        torch.manual_seed(args.seed)
        config = MiniTuringConfig(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            ffn_size=args.ffn_size,
            max_position_embeddings=positions,
            hidden_act="gelu_tanh" if variant == "tanh gelu" else "gelu",
        )
        self.variant = variant
        self.model = MiniTuringModel(config).train()
        if variant == "compiled":
            for block in self.model.blocks:
                block.compile()
        options = {} if variant == "default adamw" else {"fused": True}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **options)

    @contextlib.contextmanager
    def switched(self):
        """Undo this contestant's lever for the duration of its steps."""
        with contextlib.ExitStack() as stack:
            if self.variant in UNDONE_IN_MODEL:
                name, replacement = UNDONE_IN_MODEL[self.variant]
                stack.enter_context(mock.patch.object(transformer, name, replacement))
            stack.enter_context(
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.variant != "fp32")
            )
            yield

    def steps(self, batches: list[dict]) -> float:
        """Seconds for these training steps."""
        start = time.perf_counter()
        for batch in batches:
            with self.switched():
                loss = self.model(**batch).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def tokens(batch: dict) -> int:
    """Real tokens of a batch (padding excluded)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def run(args: argparse.Namespace) -> list[dict]:
    objectives = [x.strip() for x in args.objectives.split(",") if x.strip()]
    variants = [x.strip() for x in args.variants.split(",") if x.strip()]
    unknown = [v for v in variants if v not in VARIANTS + OPT_IN] + [
        o for o in objectives if o not in ("masked_lm", "summarize")
    ]
    if unknown or not variants or not objectives:
        raise SystemExit(f"error: unknown objective or variant {unknown}; see --help")
    if "defaults" not in variants:
        variants.insert(0, "defaults")
    if min(args.rounds, args.steps, args.batch_size) < 1:
        raise SystemExit("error: --rounds, --steps and --batch-size must be >= 1")
    rows = []
    shortest = min(96, args.source_len)
    # Every source length once, in a fixed random order: batch k of the run has the k-th, so no
    # two batches share a length and an unpadded batch always has a shape not seen before.
    order = torch.randperm(
        args.source_len - shortest + 1, generator=torch.Generator().manual_seed(args.seed)
    )
    fresh = [shortest + int(i) for i in order]
    for objective in objectives:
        chosen = [v for v in variants if objective == "summarize" or v != "exact lengths"]
        positions = max(args.seq_len, args.source_len + args.target_len)
        contestants = {v: Contestant(args, v, positions) for v in chosen}

        def batches(v: str, longest: list[int], seed: int, objective: str = objective):
            multiple = 1 if v == "exact lengths" else PAD_MULTIPLE
            return make_batches(args, objective, longest, multiple, seed)

        # Warm-up, as after the first minutes of a run: every padded shape once (the kernels
        # prepared for a shape are shared by every variant of the process), then one step
        # each for the allocator and optimizer state.
        every_shape = list(range(shortest, args.source_len + 1, PAD_MULTIPLE))
        for v in ("defaults", "compiled"):  # compiled: every shape compiled before timing
            if v in contestants:
                contestants[v].steps(batches(v, every_shape, -1))
        for v, c in contestants.items():
            c.steps(batches(v, [args.source_len], -2))
        seconds: dict[str, float] = {v: 0.0 for v in chosen}
        counts: dict[str, int] = {v: 0 for v in chosen}
        for round_index in range(args.rounds):
            start = round_index * args.steps
            longest = [fresh[(start + i) % len(fresh)] for i in range(args.steps)]
            names = list(contestants)
            shift = round_index % len(names)  # each variant leads a round in turn
            for v in names[shift:] + names[:shift]:
                c = contestants[v]
                work = batches(v, longest, round_index)
                seconds[v] += c.steps(work)
                counts[v] += sum(tokens(b) for b in work)
        base = counts["defaults"] / seconds["defaults"]
        for v in chosen:
            speed = counts[v] / seconds[v]
            rows.append({"objective": objective, "variant": v, "tokens_per_s": speed,
                         "vs_defaults": speed / base})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; shape "
        f"{args.num_layers} x {args.hidden_size}, batch {args.batch_size}; "
        f"{args.rounds} rounds of {args.steps} steps, variants interleaved",
        flush=True,
    )
    rows = run(args)
    print(f"\n{'objective':<10}  {'variant':<15}  {'tokens/s':>9}  {'vs defaults':>11}")
    for r in rows:
        print(
            f"{r['objective']:<10}  {r['variant']:<15}  {r['tokens_per_s']:>9,.0f}  "
            f"{r['vs_defaults']:>10.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
