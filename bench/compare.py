"""minituring against Hugging Face, side by side, on this machine, in one run.

    python bench/compare.py                                   # every part, tiny shape
    python bench/compare.py --parts mlm --steps 40 --json bench.json
    python bench/compare.py --device cuda --preset base       # GPU: BERT-base shape, sequence 512

Parts (``--parts``):

* ``mlm``: masked-LM training. HF ``BertForMaskedLM`` + ``Trainer`` +
  ``DataCollatorForLanguageModeling`` against ``train.py --objectives masked_lm=1`` at the same
  shape, on the same packed blocks ([CLS] + seq_len-1 tokens of the flat token stream), in the
  same precision, with the same schedule and fused AdamW. Also the machine's ceiling (a square
  matrix product in that precision, the better of a reading before and one after the part) and
  each trainer's model FLOP/s as a fraction of it.
* ``seq2seq``: summarization training. HF ``BartForConditionalGeneration`` (about our parameter
  count) + ``Trainer`` + ``DataCollatorForSeq2Seq`` against ``train.py --objectives summarize=1``
  on the same document/summary pairs. The two architectures differ, so each side's FLOPs per
  token are counted (``torch.utils.flop_counter``, one full-length batch) and its FLOP/s shown
  as a fraction of the ceiling.
* ``generate``: a batch of summaries, exactly N new tokens each (min = max new tokens), greedy
  and beam search, ours against HF BART's ``generate``; both randomly initialised.
* ``ceiling``: the matrix-product ceiling alone (always run with ``mlm`` and ``seq2seq``).
* ``quality``: quality at equal wall-clock time. Each masked-LM trainer gets the number of steps
  its measured speed (the ``mlm`` part, always run with it) fits into ``--quality-seconds``, with
  its schedule stretched over them, from a fresh start; then both models are scored on the same
  held-out blocks with the same masks (token-level, 15%, 80/10/10): the mean cross-entropy of
  the masked tokens. The faster trainer should reach the lower held-out loss.

The parent prepares the data once (tokenizer, blocks, pairs) in a temporary folder, then starts
each contestant in its own process (``bench/_workers.py``) one after another, so each has the
machine to itself and its peak memory is its own. Each part runs its sides in the order HF,
ours, ours, HF (training ``--train-rounds`` runs a side, tokens and seconds pooled; generation,
a few seconds a process, ``--gen-rounds`` times that, every timed call pooled): a machine whose
speed drifts over the part, or differs from one process to the next, weighs on both sides
alike. The table comes last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "_workers.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARTS = ("mlm", "seq2seq", "generate", "quality", "ceiling")
SHAPES = {
    "tiny": dict(num_layers=4, hidden_size=256, num_heads=4, ffn_size=1024, seq_len=128),
    "base": dict(num_layers=12, hidden_size=768, num_heads=12, ffn_size=3072, seq_len=512),
}
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------- flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/compare.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--parts", default="mlm,seq2seq,generate,quality", help=f"comma list of {PARTS}")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(SHAPES),
        help="model shape; base (12 x 768, sequence 512) needs a GPU",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="training precision of both sides; auto decides as train.py does (bf16 autocast "
        "on GPUs, and on CPUs where it measures faster)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed masked-LM steps (CPU 20, GPU 50)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed masked-LM steps (CPU 5, GPU 10)"
    )
    p.add_argument("--seq2seq-steps", type=int, default=None, help="timed steps (CPU 12, GPU 50)")
    p.add_argument("--seq2seq-warmup", type=int, default=None, help="untimed steps (CPU 3, GPU 10)")
    p.add_argument(
        "--train-rounds",
        type=int,
        default=2,
        help="training runs a side, masked LM and summarization, in the order HF, ours, ours, "
        "HF, ...; tokens and seconds of all runs pooled",
    )
    p.add_argument("--batch-size", type=int, default=32, help="training batch, both parts")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, both sides")
    p.add_argument("--seed", type=int, default=0)
    shape = p.add_argument_group("shape overrides (default: the preset's)")
    for name in ("num_layers", "hidden_size", "num_heads", "ffn_size", "seq_len"):
        shape.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    shape.add_argument("--max-positions", type=int, default=512)
    shape.add_argument("--vocab-size", type=int, default=8192, help="tokenizer entries")
    shape.add_argument(
        "--bart-layers",
        default=None,
        help="BART encoder,decoder layers (default: half our layers each, about our size)",
    )
    s2s = p.add_argument_group("summarization and generation")
    s2s.add_argument("--source-len", type=int, default=256)
    s2s.add_argument("--target-len", type=int, default=32)
    s2s.add_argument(
        "--hf-sampler",
        default="group_by_length",
        choices=("group_by_length", "random"),
        help="HF Trainer's train_sampling_strategy for BART (ours buckets by length)",
    )
    s2s.add_argument("--gen-batch", type=int, default=8, help="documents per generate call")
    s2s.add_argument("--new-tokens", type=int, default=32, help="exactly this many, both sides")
    s2s.add_argument("--beams", type=int, default=4)
    s2s.add_argument("--no-repeat-ngram", type=int, default=3)
    s2s.add_argument("--gen-repeats", type=int, default=7, help="timed calls per process")
    s2s.add_argument(
        "--gen-rounds",
        type=int,
        default=2,
        help="rounds of HF, ours, ours, HF processes; every timed call pooled, median reported",
    )
    s2s.add_argument("--gen-precision", default="fp32", choices=("fp32", "bf16"))
    quality = p.add_argument_group("quality at equal wall-clock time")
    quality.add_argument(
        "--quality-seconds", type=float, default=60, help="training time given to each side"
    )
    quality.add_argument(
        "--quality-blocks", type=int, default=256, help="held-out blocks the loss is taken on"
    )
    data = p.add_argument_group("data (default: the embedded corpus)")
    data.add_argument("--train-text", nargs="+", default=[], help="as train.py --train-text")
    data.add_argument("--train-pairs", nargs="+", default=[], help="as train.py --train-pairs")
    data.add_argument("--corpus-max-chars", type=int, default=None)
    run = p.add_argument_group("run")
    run.add_argument("--matmul-size", type=int, default=None, help="ceiling (CPU 2048, GPU 8192)")
    run.add_argument("--threads", type=int, default=None, help="torch threads per contestant")
    run.add_argument("--worker-timeout", type=float, default=900, help="seconds per contestant")
    run.add_argument("--json", default=None, metavar="PATH", help="write all results here")
    run.add_argument("--keep", action="store_true", help="keep the temporary folder")
    run.add_argument(
        "--in-process",
        action="store_true",
        help="run the contestants in this process (quick checks; no peak memory)",
    )
    return p


def resolve(args: argparse.Namespace) -> dict:
    """Flags -> a complete, checked settings dict (device, precision, shape, steps)."""
    import torch

    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        raise SystemExit(f"error: --parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if "quality" in parts and "mlm" not in parts:  # the step counts come from its speeds
        parts.insert(parts.index("quality"), "mlm")
    if ("mlm" in parts or "seq2seq" in parts) and "ceiling" not in parts:
        parts.append("ceiling")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SystemExit(f"error: --device must be auto, cpu, cuda or cuda:N, got {device!r}")
    gpu = device.startswith("cuda")
    if args.preset == "base" and not gpu:
        raise SystemExit(
            "error: --preset base (12 layers x 768, sequence 512) is the GPU benchmark; "
            "run it with a CUDA device (--device cuda)"
        )
    shape = dict(SHAPES[args.preset])
    for key in shape:
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    shape["max_positions"] = args.max_positions

    def given(value: int | None, cpu: int, cuda: int) -> int:
        return value if value is not None else (cuda if gpu else cpu)

    steps = {
        "mlm": (given(args.warmup, 5, 10), given(args.steps, 20, 50)),
        "seq2seq": (given(args.seq2seq_warmup, 3, 10), given(args.seq2seq_steps, 12, 50)),
    }
    checks = [
        (all(w >= 1 and s >= 1 for w, s in steps.values()), "steps and warm-ups must be >= 1"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (shape["hidden_size"] % shape["num_heads"] == 0, "--hidden-size must divide by heads"),
        (shape["seq_len"] <= args.max_positions, "--seq-len exceeds --max-positions"),
        (
            args.source_len + max(args.target_len, args.new_tokens) <= args.max_positions,
            "--source-len + --target-len (or --new-tokens) exceeds --max-positions",
        ),
        (args.gen_batch >= 1 and args.new_tokens >= 1, "--gen-batch, --new-tokens must be >= 1"),
        (
            min(args.beams, args.gen_repeats, args.gen_rounds, args.train_rounds) >= 1,
            "--beams, --gen-repeats, --gen-rounds, --train-rounds must be >= 1",
        ),
        (args.quality_seconds > 0, "--quality-seconds must be > 0"),
        (args.quality_blocks >= 1, "--quality-blocks must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise SystemExit(
            f"error: --json {args.json}: folder {Path(args.json).parent} does not exist"
        )
    if args.bart_layers:
        try:
            bart = [int(x) for x in args.bart_layers.split(",")]
        except ValueError:
            bart = []
        if len(bart) != 2 or min(bart) < 1:
            raise SystemExit(
                f"error: --bart-layers wants ENC,DEC (>= 1 each), got {args.bart_layers!r}"
            )
    else:
        bart = [max(1, shape["num_layers"] // 2)] * 2
    precision = args.precision
    if precision == "auto":
        if gpu:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            # The very test train.py's --precision auto runs, decided once for both sides.
            from trainer.distributed import _bf16_faster_on_cpu

            precision = "bf16" if _bf16_faster_on_cpu() else "fp32"
    return {
        "parts": parts,
        "gen_rounds": args.gen_rounds,
        "train_rounds": args.train_rounds,
        "device": device,
        "gpu": gpu,
        "precision": precision,
        "shape": shape,
        "steps": steps,
        "bart_layers": bart,
        "matmul_size": args.matmul_size or (8192 if gpu else 2048),
    }


# ---------------------------------------------------------------------------- shared data


def data_flags(args: argparse.Namespace) -> list[str]:
    """train.py flags that make our trainer load the very data the parent prepared."""
    flags: list[str] = []
    if args.train_text:
        flags += ["--train-text", *args.train_text]
    if args.train_pairs:
        flags += ["--train-pairs", *args.train_pairs]
    if args.corpus_max_chars is not None:
        flags += ["--corpus-max-chars", str(args.corpus_max_chars)]
    return flags


def frame_source(source, cls: int, sep: int, source_len: int) -> list[int]:
    """[CLS] source [SEP], the source cut to fit source_len, as both sides see it."""
    return [cls, *[int(t) for t in source[: source_len - 2]], sep]


def mlm_blocks(flat, seq_len: int, cls: int):
    """Every block our masked-LM stream draws from: [CLS] + seq_len-1 consecutive tokens of
    the flat stream (data/objectives/masked_lm.py ``block``), as one (n, seq_len) array."""
    import numpy as np

    n = len(flat) // (seq_len - 1)
    body = np.asarray(flat[: n * (seq_len - 1)], dtype=np.int64).reshape(n, seq_len - 1)
    return np.concatenate([np.full((n, 1), cls, dtype=np.int64), body], axis=1)


def heldout_blocks(streams, ids, cfg, tmp: Path, args: argparse.Namespace, vocab: int) -> str:
    """The held-out text's blocks, masked once with a fixed seed (token-level: what both
    trainers are asked to predict, whatever masking each trains with), saved for both sides."""
    import numpy as np
    from datasets import Dataset

    from data.batching import MaskedLMStream
    from data.objectives.masked_lm import MaskingConfig

    held = streams.eval["masked_lm"]
    masking = MaskingConfig(rate=cfg.mask_rate, whole_word=False)
    stream = MaskedLMStream(
        held.flat, held.seq_len, ids, masking, word_start=None, vocab_size=vocab
    )
    n = min(len(stream), args.quality_blocks)
    if n == 0:
        raise SystemExit("error: --parts quality: the held-out text gives no full block")
    batch = stream.batch(np.arange(n), np.arange(n), seed=args.seed + 1)
    path = tmp / "mlm-heldout"
    Dataset.from_dict({k: batch[k] for k in ("input_ids", "labels")}).save_to_disk(str(path))
    return str(path)


def replay_seq2seq(stream, batch_size: int, seed: int, total: int) -> dict[str, list[int]]:
    """Our loader's first ``total`` summarization batches (it is a pure function of seed and
    position): per step, source + target tokens, input positions, and non-padding inputs."""
    from data.batching import MixtureLoader

    loader = MixtureLoader({"summarize": stream}, {"summarize": 1.0}, batch_size, seed)
    out: dict[str, list[int]] = {"real": [], "padded": [], "nonpad": []}
    for _ in range(total):
        _, batch = loader.next_batch()
        targets = int((batch["labels"] != IGNORE_INDEX).sum())
        out["real"].append(int(batch["prefix_lengths"].sum()) + targets)
        out["padded"].append(int(batch["input_ids"].numel()))
        out["nonpad"].append(int(batch["attention_mask"].sum()))
    return out


def prepare(args: argparse.Namespace, settings: dict, tmp: Path) -> dict:
    """Tokenizer, masked-LM blocks, summarization pairs and generation sources, once, in
    ``tmp``; returns the spec every contestant reads."""
    from datasets import Dataset

    from data.pipeline import DataConfig, build_streams, load_raw
    from data.tokenizer import load_tokenizer, save_tokenizer, special_ids, train_tokenizer
    from model.config import round_vocab

    parts, shape = settings["parts"], settings["shape"]
    spec: dict = {
        "tmp": str(tmp),
        "device": settings["device"],
        "precision": settings["precision"],
        "preset": args.preset,
        "seed": args.seed,
        "threads": args.threads,
        "shape": dict(shape),
        "ceiling": {"size": settings["matmul_size"], "trials": 5, "trial_seconds": 0.3},
        "seq2seq": {"bart_layers": settings["bart_layers"]},
    }
    if parts == ["ceiling"]:  # nothing to train: no data needed
        return {**spec, "data": "none", "prepare_seconds": 0.0}
    cfg = DataConfig(
        train_text=list(args.train_text),
        train_pairs=list(args.train_pairs),
        corpus_max_chars=args.corpus_max_chars,
        source_len=args.source_len,
        target_len=args.target_len,
    )
    start = time.perf_counter()
    raw = load_raw(cfg)
    objectives = []
    if "mlm" in parts:
        if not raw.train_texts:
            raise SystemExit("error: --parts mlm needs training text; the data has none")
        objectives.append("masked_lm")
    if "seq2seq" in parts or "generate" in parts:
        if not raw.train_pairs:
            raise SystemExit(
                "error: --parts seq2seq/generate need document/summary pairs; the data has none"
            )
        objectives.append("summarize")
    # One tokenizer for both sides, trained as train.py trains its own.
    tokenizer = train_tokenizer(
        raw.train_texts + [d for d, _ in raw.train_pairs], vocab_size=args.vocab_size
    )
    save_tokenizer(tokenizer, tmp / "tokenizer")
    tokenizer = load_tokenizer(tmp / "tokenizer")  # exactly what our trainer will load
    ids = special_ids(tokenizer)
    vocab = round_vocab(len(tokenizer))
    spec.update(
        tokenizer=str(tmp / "tokenizer"),
        lr=args.lr,
        source_len=args.source_len,
        target_len=args.target_len,
        data_flags=data_flags(args),
        data=raw.description,
    )
    spec["shape"].update(vocab_size=vocab, tokenizer_size=len(tokenizer))
    # build_streams also warms the on-disk tokenization cache our trainer then reads.
    streams = build_streams(raw, tokenizer, cfg, objectives, shape["seq_len"])

    def schedule(part: str) -> dict:
        warmup, steps = settings["steps"][part]
        # train.py's warm-up is min(--warmup-steps, total // 10); the same length for HF.
        return {
            "warmup": warmup,
            "steps": steps,
            "lr_warmup": max((warmup + steps) // 10, 1),
            "batch_size": args.batch_size,
        }

    if "mlm" in parts:
        blocks = mlm_blocks(streams.train["masked_lm"].flat, shape["seq_len"], ids.cls)
        if len(blocks) < args.batch_size:
            raise SystemExit(
                f"error: the text gives {len(blocks)} blocks of {shape['seq_len']} tokens, "
                f"fewer than one batch ({args.batch_size})"
            )
        Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(tmp / "mlm-blocks"))
        spec["mlm"] = {
            **schedule("mlm"),
            "seq_len": shape["seq_len"],
            "mask_rate": cfg.mask_rate,
            "dataset": str(tmp / "mlm-blocks"),
            "blocks": len(blocks),
        }
    if "quality" in parts:
        spec["quality"] = {
            "seconds": args.quality_seconds,
            "batch_size": args.batch_size,
            "seq_len": shape["seq_len"],
            "dataset": heldout_blocks(streams, ids, cfg, tmp, args, vocab),
        }
    if "summarize" in objectives:
        train_stream = streams.train["summarize"]
        if "seq2seq" in parts:
            sources = [
                frame_source(s, ids.cls, ids.sep, args.source_len) for s in train_stream.sources
            ]
            labels = [
                [*(int(t) for t in tgt[: args.target_len - 1]), ids.sep]
                for tgt in train_stream.targets
            ]
            Dataset.from_dict({"input_ids": sources, "labels": labels}).save_to_disk(
                str(tmp / "pairs")
            )
            sched = schedule("seq2seq")
            spec["seq2seq"] = {
                **sched,
                "source_len": args.source_len,
                "target_len": args.target_len,
                "dataset": str(tmp / "pairs"),
                "pairs": len(sources),
                "bart_layers": settings["bart_layers"],
                "hf_group_by_length": args.hf_sampler == "group_by_length",
                "ours_replay": replay_seq2seq(
                    train_stream, args.batch_size, args.seed, sched["warmup"] + sched["steps"]
                ),
            }
        if "generate" in parts:
            # Held-out documents first; training ones only if too few are held out.
            pool = list(streams.eval["summarize"].sources) + list(train_stream.sources)
            chosen = [frame_source(s, ids.cls, ids.sep, args.source_len) for s in pool]
            chosen = chosen[: args.gen_batch]
            while len(chosen) < args.gen_batch:
                chosen += chosen[: args.gen_batch - len(chosen)]
            spec["generate"] = {
                "sources": chosen,
                "new_tokens": args.new_tokens,
                "modes": {"greedy": 1, f"beam {args.beams}": args.beams},
                "no_repeat_ngram_size": args.no_repeat_ngram,
                "repeats": args.gen_repeats,
                "precision": args.gen_precision,
            }
    spec["prepare_seconds"] = time.perf_counter() - start
    return spec


# ---------------------------------------------------------------------------- contestants


def run_in_process(task: str, spec: dict) -> dict:
    """One contestant in this process (--in-process): no start-up cost, but contestants share
    a heap, so no peak memory is reported."""
    import traceback

    sys.path.insert(0, str(WORKERS.parent))
    import _workers

    start = time.perf_counter()
    print(f"  {task:<14}", end="", flush=True)
    try:
        result = _workers.TASKS[task](spec)
    except Exception as err:  # one failing contestant must not hide the others' numbers
        print(" FAILED:", flush=True)
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"}
    print(f" done in {time.perf_counter() - start:.0f}s", flush=True)
    # A peak taken here would be the whole run's, not this contestant's.
    return {k: v for k, v in result.items() if not k.startswith(("peak_mem", "mem_kind"))}


def run_worker(task: str, spec_file: Path, tmp: Path, timeout: float) -> dict:
    """One contestant in a fresh interpreter; its result, or {"error": ...} with its log."""
    result_file, log_file = tmp / f"{task}.json", tmp / f"{task}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    print(f"  {task:<14}", end="", flush=True)
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, str(WORKERS), task, str(spec_file), str(result_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                timeout=timeout,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.perf_counter() - start
    if code == 0 and result_file.is_file():
        print(f" done in {seconds:.0f}s", flush=True)
        return json.loads(result_file.read_text())
    why = f"timed out after {timeout:.0f}s" if code is None else f"exit status {code}"
    tail = log_file.read_text(errors="replace").strip().splitlines()[-25:]
    print(f" FAILED ({why}); last lines of {log_file}:", flush=True)
    for line in tail:
        print(f"      {line}", flush=True)
    return {"error": why, "log": str(log_file)}


def _abba(part: str, rounds: int) -> list[str]:
    """HF, ours, then ours, HF, and so on for ``rounds`` runs a side: drift over the part falls
    on both sides alike (see merge_runs). One round is HF then ours."""
    pairs = [[f"{part}_hf", f"{part}_ours"], [f"{part}_ours", f"{part}_hf"]]
    return [task for i in range(rounds) for task in pairs[i % 2]]


def tasks_for(parts: list[str], gen_rounds: int = 1, train_rounds: int = 1) -> list[str]:
    order = []
    if "ceiling" in parts:
        order.append("ceiling")
    for part, tasks in (
        # The ceiling again after masked LM: the better reading of the two (see merge_runs).
        ("mlm", _abba("mlm", train_rounds) + (["ceiling"] if "ceiling" in parts else [])),
        ("seq2seq", _abba("seq2seq", train_rounds)),
        # A process's own speed varies too (here by up to half, a whole process long), so
        # generation, a few seconds a process, has several.
        ("generate", _abba("generate", 2 * gen_rounds)),
        ("quality", ["quality_hf", "quality_ours"]),
    ):
        if part in parts:
            order += tasks
    return order


def merge_runs(first: dict | None, second: dict) -> dict:
    """A task's second run joined to its first. Training: tokens and seconds summed, so the
    speed is that of all timed steps together (each run's speed kept in ``runs``), data wait
    and padding weighted by time and tokens. Generation: every timed call pooled and their
    median reported. Both keep the higher peak memory. Ceiling: the faster reading, since a
    machine only ever runs below its ceiling. A failed run stands for both."""
    if first is None or not _ok(second):
        return second
    if not _ok(first):
        return first
    if "flops_per_s" in first:
        best = max(first, second, key=lambda r: r["flops_per_s"])
        readings = first.get("readings", [first["flops_per_s"]]) + [second["flops_per_s"]]
        return {**best, "readings": readings}
    if "tokens_per_s" in first:
        seconds, tokens = first["seconds"] + second["seconds"], first["tokens"] + second["tokens"]
        merged = {
            **first,
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "runs": first.get("runs", [first["tokens_per_s"]]) + [second["tokens_per_s"]],
        }
        for key, weight in (("data_wait", "seconds"), ("padding_share", "tokens")):
            if key in first and key in second:
                total = first[weight] + second[weight]
                merged[key] = (first[key] * first[weight] + second[key] * second[weight]) / total
    else:
        merged = {**second, "modes": {}}
        for mode, a in first["modes"].items():
            times = a["times"] + second["modes"][mode]["times"]
            merged["modes"][mode] = {
                **a,
                "times": times,
                "seconds_per_batch": statistics.median(times),
            }
    for key in ("peak_mem_mib", "peak_mem_mib_process"):
        if key in first and key in second:
            merged[key] = max(first[key], second[key])
    return merged


def equal_time_steps(spec: dict, results: dict) -> bool:
    """Each side's step count for ``--quality-seconds`` of training at the speed it reached in
    the mlm part (both sides' steps hold the same tokens). False when a speed is missing."""
    q = spec["quality"]
    tokens_per_step = q["batch_size"] * q["seq_len"]
    steps = {}
    for side in ("hf", "ours"):
        r = results.get(f"mlm_{side}")
        if not _ok(r):
            return False
        steps[side] = max(1, round(q["seconds"] * r["tokens_per_s"] / tokens_per_step))
    q["steps"] = steps
    return True


# ---------------------------------------------------------------------------- the table


def _ok(result: dict | None) -> bool:
    return bool(result) and "error" not in result


def model_flops_per_token(spec: dict) -> int:
    """Training FLOPs per token of the masked-LM shape (our config's PaLM-style count),
    the same number for both sides since the shape is the same."""
    from model.config import MiniTuringConfig

    s = spec["shape"]
    config = MiniTuringConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"],
        num_layers=s["num_layers"],
        num_heads=s["num_heads"],
        ffn_size=s["ffn_size"],
        max_position_embeddings=s["max_positions"],
    )
    return config.flops_per_token(spec["mlm"]["seq_len"])


def build_rows(spec: dict, results: dict) -> list[dict]:
    """One row per measurement; every ratio is computed here from the measured numbers."""
    rows: list[dict] = []

    def row(part, contestant, value, unit, **extra) -> dict:
        r = {"part": part, "contestant": contestant, "value": value, "unit": unit}
        r.update(extra)
        rows.append(r)
        return r

    def mem(result: dict | None) -> float | None:
        return result.get("peak_mem_mib") if _ok(result) else None

    ceiling = results.get("ceiling")
    peak = ceiling["flops_per_s"] if _ok(ceiling) else None
    for part, hf_name, ours_name in (
        ("mlm", "HF BertForMaskedLM + Trainer", "ours train.py masked_lm"),
        ("seq2seq", "HF BART + Trainer", "ours train.py summarize"),
    ):
        hf, ours = results.get(f"{part}_hf"), results.get(f"{part}_ours")
        if hf is None and ours is None:
            continue
        if part == "seq2seq" and _ok(hf):
            enc, dec = spec["seq2seq"]["bart_layers"]
            hf_name = f"HF BART {enc}+{dec} layers + Trainer"
        hf_tps = hf["tokens_per_s"] if _ok(hf) else None
        ours_tps = ours["tokens_per_s"] if _ok(ours) else None
        ratio = ours_tps / hf_tps if hf_tps and ours_tps else None
        extra_hf = {"params": hf.get("params")} if _ok(hf) else {"error": (hf or {}).get("error")}
        extra_ours = (
            {"params": ours.get("params"), "data_wait": ours.get("data_wait")}
            if _ok(ours)
            else {"error": (ours or {}).get("error")}
        )
        for name, tps, result, extra in (
            (hf_name, hf_tps, hf, extra_hf),
            (ours_name, ours_tps, ours, extra_ours),
        ):
            r = row(part, name, tps, "tokens/s", peak_mem_mib=mem(result), **extra)
            if result is ours:
                r["ratio"] = ratio
            if _ok(result) and "padding_share" in result:
                r["padding_share"] = result["padding_share"]
            if _ok(result) and "runs" in result:
                r["runs"] = result["runs"]
        if not peak:
            continue
        for name, tps, result in (("HF", hf_tps, hf), ("ours", ours_tps, ours)):
            if not tps:
                continue
            # Masked LM: one shape, one formula for both. Summarization: two architectures, so
            # each side's FLOPs as counted on a full-length batch (see counted_flops_per_token).
            per_token = model_flops_per_token(spec) if part == "mlm" else result["flops_per_token"]
            achieved = per_token * tps
            row(
                part,
                f"{name} model FLOP/s" if part == "mlm" else f"{name} counted FLOP/s",
                achieved,
                "FLOP/s",
                fraction_of_ceiling=achieved / peak,
                flops_per_token=per_token,
            )
    for side, name in (("hf", "HF BertForMaskedLM + Trainer"), ("ours", "ours train.py masked_lm")):
        result = results.get(f"quality_{side}")
        if result is None:
            continue
        extra = (
            {
                "steps": result["steps"],
                "train_seconds": result["train_seconds"],
                "train_tokens": result["train_tokens"],
            }
            if _ok(result)
            else {"error": result.get("error")}
        )
        value = result["heldout_loss"] if _ok(result) else None
        row("quality", name, value, "loss", **extra)
    hf, ours = results.get("generate_hf"), results.get("generate_ours")
    if hf is not None or ours is not None:
        for mode in spec["generate"]["modes"]:
            hf_s = hf["modes"][mode]["seconds_per_batch"] if _ok(hf) else None
            ours_s = ours["modes"][mode]["seconds_per_batch"] if _ok(ours) else None
            row(f"generate {mode}", "HF BART generate", hf_s, "s/batch", peak_mem_mib=mem(hf))
            row(
                f"generate {mode}",
                "ours model.generate",
                ours_s,
                "s/batch",
                peak_mem_mib=mem(ours),
                # A speed-up: HF's seconds over ours, so > 1 means ours is faster.
                ratio=hf_s / ours_s if hf_s and ours_s else None,
            )
    if ceiling is not None:
        row(
            "ceiling",
            f"matmul {spec['ceiling']['size']}^2 {ceiling.get('dtype', '?')}",
            peak,
            "FLOP/s",
            **({"error": ceiling["error"]} if not _ok(ceiling) else {}),
        )
    return rows


def _fmt_value(r: dict) -> str:
    v = r["value"]
    if v is None:
        return "FAILED" if r.get("error") else "-"
    if r["unit"] == "tokens/s":
        return f"{v:,.0f} tok/s"
    if r["unit"] == "loss":
        return f"{v:.3f} held-out loss"
    if r["unit"] == "FLOP/s":
        return f"{v / 1e12:.3f} TFLOP/s" if v >= 1e12 else f"{v / 1e9:.2f} GFLOP/s"
    return f"{v:.3f} s/batch"


def format_table(rows: list[dict]) -> str:
    header = ("part", "contestant", "speed", "ours vs HF", "peak mem", "data wait", "note")
    lines = []
    for r in rows:
        note = []
        if r.get("params"):
            note.append(f"{r['params'] / 1e6:.2f}M params")
        if r.get("padding_share") is not None:
            note.append(f"{100 * r['padding_share']:.0f}% padding")
        if r.get("train_seconds") is not None:
            note.append(
                f"{r['steps']} steps, {r['train_tokens'] / 1e6:.2f}M tokens "
                f"in {r['train_seconds']:.0f}s"
            )
        if r.get("runs"):
            note.append("runs " + " / ".join(f"{x:,.0f}" for x in r["runs"]))
        if r.get("fraction_of_ceiling") is not None:
            note.append(
                f"{100 * r['fraction_of_ceiling']:.1f}% of ceiling, "
                f"{r['flops_per_token'] / 1e6:.1f} MFLOP/token"
            )
        ratio = r.get("ratio")
        lines.append(
            (
                r["part"],
                r["contestant"],
                _fmt_value(r),
                f"{ratio:.2f}x" if ratio else "",
                f"{r['peak_mem_mib']:,.0f} MiB" if r.get("peak_mem_mib") else "",
                f"{100 * r['data_wait']:.1f}%" if r.get("data_wait") is not None else "",
                ", ".join(note),
            )
        )
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(x.rstrip() for x in out)


def machine() -> dict:
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "cpu": platform.processor() or "",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe(spec: dict, settings: dict, results: dict) -> str:
    """What was compared, under the table: shapes, steps, precision, HF's settings."""
    s = spec["shape"]
    lines = [
        f"device {settings['device']}, training precision {settings['precision']}"
        + (" (autocast)" if settings["precision"] == "bf16" else "")
        + f"; shape {s['num_layers']} layers x {s['hidden_size']} hidden, {s['num_heads']} "
        f"heads, FFN {s['ffn_size']}, vocabulary {s.get('vocab_size', '-')}; data: {spec['data']}",
    ]
    if "mlm" in spec:
        m = spec["mlm"]
        lines.append(
            f"mlm: sequence {m['seq_len']}, batch {m['batch_size']}, {m['warmup']} warm-up + "
            f"{m['steps']} timed steps; tokens/s = sequences x {m['seq_len']} / wall seconds "
            "from the end of the warm-up step to the end of the last step"
        )
    if settings["train_rounds"] > 1:
        lines.append(
            f"training: {settings['train_rounds']} runs a side, order HF, ours, ours, HF, ...; "
            "speed = all runs' tokens / all runs' timed seconds (each run's in the note)"
        )
    if "source_len" in spec["seq2seq"]:
        q = spec["seq2seq"]
        lines.append(
            f"seq2seq: source {q['source_len']}, target {q['target_len']}, batch "
            f"{q['batch_size']}, {q['warmup']} + {q['steps']} steps; tokens = source tokens "
            "with their [CLS]/[SEP] + target tokens with the closing [SEP], no padding; counted "
            "FLOP/s = tokens/s x the FLOPs per token torch.utils.flop_counter counts in one "
            "forward and backward of a full-length batch (attention as plain matmuls)"
        )
    if "steps" in spec.get("quality", {}):
        q = spec["quality"]
        lines.append(
            f"quality: {q['seconds']:g}s of masked-LM training each (steps = seconds x the "
            f"speed measured above: HF {q['steps']['hf']}, ours {q['steps']['ours']}), "
            "schedule over those steps; loss = mean cross-entropy of the masked tokens of "
            "the same held-out blocks, same masks"
        )
    if "generate" in spec:
        g = spec["generate"]
        lines.append(
            f"generate: {len(g['sources'])} documents, exactly {g['new_tokens']} new tokens, "
            f"no_repeat_ngram_size {g['no_repeat_ngram_size']}, {g['precision']}, random init; "
            f"median of {2 * settings['gen_rounds']} processes x {g['repeats']} calls a side "
            f"(order HF, ours, ours, HF, {settings['gen_rounds']} times; one warm-up call each); "
            "ratio = HF s / ours s"
        )
    for task in ("mlm_hf", "seq2seq_hf"):
        r = results.get(task)
        if _ok(r):
            c = r["hf_config"]
            t = c["training_arguments"]
            keys = (
                "bf16", "use_cpu", "optim", "learning_rate", "lr_scheduler_type",
                "warmup_steps", "dataloader_num_workers", "train_sampling_strategy",
                "group_by_length",
            )  # fmt: skip
            shown = ", ".join(f"{k}={t[k]}" for k in keys if k in t)
            lines.append(f"{task}: {c['model']}, {c['attn_implementation']} attention, "
                         f"{c['collator']}; {shown}; autocast in its forward: "
                         f"{c.get('autocast_seen')}")  # fmt: skip
    mem = {r.get("mem_kind") for r in results.values() if _ok(r) and r.get("mem_kind")}
    if mem:
        lines.append(f"peak mem, each contestant's own process: {'; '.join(sorted(mem))}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = resolve(args)
    tmp = Path(tempfile.mkdtemp(prefix="minituring-bench-"))
    try:
        print(f"preparing data and tokenizer in {tmp} ...", flush=True)
        try:
            spec = prepare(args, settings, tmp)
        except (ValueError, OSError) as err:
            # Data errors carry their own explanation (file, record, expectation).
            raise SystemExit(f"error: {err}") from None
        spec_file = tmp / "spec.json"
        spec_file.write_text(json.dumps(spec))
        where = "in this process" if args.in_process else "one process each"
        print(f"prepared in {spec['prepare_seconds']:.0f}s; contestants, {where}:")
        results = {}
        for task in tasks_for(settings["parts"], settings["gen_rounds"], settings["train_rounds"]):
            if task.startswith("quality"):
                if not equal_time_steps(spec, results):
                    results[task] = {"error": "the mlm part failed: no speed to size the run by"}
                    continue
                spec_file.write_text(json.dumps(spec))
            if args.in_process:
                result = run_in_process(task, json.loads(spec_file.read_text()))
            else:
                result = run_worker(task, spec_file, tmp, args.worker_timeout)
            results[task] = merge_runs(results.get(task), result)
        rows = build_rows(spec, results)
        report = {
            "command": [sys.executable, *sys.argv] if argv is None else ["bench/compare.py", *argv],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "settings": {k: v for k, v in settings.items()},
            "spec": {k: v for k, v in spec.items() if k not in ("tmp",)},
            "results": results,
            "rows": rows,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print()
        print(describe(spec, settings, results))
        print()
        print(format_table(rows))
        failed = [t for t, r in results.items() if not _ok(r)]
        if failed:
            print(f"\nfailed: {', '.join(failed)} (logs in {tmp})", file=sys.stderr)
            args.keep = True
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
