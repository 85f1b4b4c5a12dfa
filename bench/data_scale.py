"""How data preparation scales with the corpus: memory, preparation time, warm start; and the
data wait with and without the prefetching thread.

    python -m bench.data_scale                       # 10 MB and 100 MB, cold and warm cache
    python -m bench.data_scale --sizes 10 100 1000   # add 1 GB
    python -m bench.data_scale --sizes 100 1000 --streaming   # and --streaming on 1 GB
    python -m bench.data_scale --numbered            # each line ends in a distinct number
    python -m bench.data_scale --prefetch --streaming         # --prefetch 0 against 2, 10 MB

Each run is ``train.py --train-text FILE --objectives masked_lm=1`` in a child process; the
columns: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
from pathlib import Path

from bench.common import Failed, run_train
from trainer.plot import read_metrics

MB = 1_000_000


def make_corpus(path: Path, size_mb: int, seed: int = 0, numbered: bool = False) -> Path:
    """``size_mb`` MB of the embedded corpus's documents, shuffled and repeated (jsonl).
    ``numbered``: every line ends in a number no other line has, as in logs and code, so the
    corpus's vocabulary grows with its size (each line is a new word to a tokenizer trainer)."""
    if path.is_file() and path.stat().st_size >= size_mb * MB:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    from data.config import DataConfig
    from data.raw import load_raw

    raw = load_raw(DataConfig())
    # Train and held-out documents both: the bench corpus gets its own held-out share.
    docs = list(raw.train_texts) + list(raw.eval_texts)
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    written, lines = 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size_mb * MB:
            order = list(range(len(docs)))
            rng.shuffle(order)
            for i in order:
                doc = docs[i]
                if numbered:
                    rows = doc.split("\n")
                    doc = "\n".join(f"{r} {lines + k}" for k, r in enumerate(rows))
                    lines += len(rows)
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= size_mb * MB:
                    break
    os.replace(tmp, path)
    return path


_PREPARED = re.compile(r"prepared in (\d+(?:\.\d+)?)s")


def run_child(corpus: Path, out: Path, cache: Path, steps: int, extra: list[str], env=None) -> dict:
    """Train on ``corpus`` in a child process (``env``: more environment variables)."""
    flags = ["--train-text", str(corpus), "--objectives", "masked_lm=1", "--max-steps", str(steps)]
    try:
        s = run_train([*flags, *extra], out, env={**(env or {}), "MINITURING_CACHE": str(cache)})
    except Failed as err:
        raise SystemExit(f"{' '.join(flags)} failed: {err}") from None
    prepared = _PREPARED.search(Path(out.parent / f"{out.name}.log").read_text())
    logged = [m for m in read_metrics(out / "metrics.jsonl") if "tokens_per_s" in m]
    return {"wall_s": s["wall_s"], "prepare_s": float(prepared.group(1)) if prepared else None,
            "peak_rss_mib": s["peak_rss_mib"], "first_step_s": s["first_step_seconds"],
            "tokens_per_s": logged[-1]["tokens_per_s"] if logged else None,
            # Over the steps after the first log window (summary.json), not the last window:
            "data_wait": s["data_wait"], "timed_tokens_per_s": s["tokens_per_s"]}  # fmt: skip


def race_prefetch(args: argparse.Namespace) -> list[dict]:
    """The same run with ``--prefetch 0`` (the step draws its own batches) and ``--prefetch 2`` (a
    thread draws them ahead), after a warm-up run has filled the cache: data wait and tokens/s."""
    size = args.sizes[0]
    corpus = args.corpus or make_corpus(args.workdir / f"corpus-{size}mb.jsonl", size)
    cache = args.workdir / "cache"
    flags = ["--log-every", "10", "--eval-every", "0", "--no-progress", "--rouge-samples", "0"]
    flags += ["--eval-batches", "1", *["--streaming"] * args.streaming, *args.extra]
    env = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {}
    run_child(corpus, args.workdir / "warm-up", cache, 2, flags, env=env)
    rows = []
    for depth in (0, 2):
        out = args.workdir / f"prefetch-{depth}"
        result = run_child(corpus, out, cache, args.steps, [*flags, "--prefetch", str(depth)], env=env)  # fmt: skip
        rows.append({"prefetch": depth, **result})
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n{'streamed' if args.streaming else 'mapped'}, {args.steps} steps, torch threads: "
          f"{args.torch_threads or 'default'}\n| --prefetch | data wait (% of step) | tokens/s |\n|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['prefetch']} | {100 * r['data_wait']:.2f} | {r['timed_tokens_per_s']:,.0f} |")
    speedup = rows[1]["timed_tokens_per_s"] / rows[0]["timed_tokens_per_s"]
    print(f"tokens/s with the thread / without: {speedup:.3f}")
    return rows


def scale(args: argparse.Namespace) -> list[dict]:
    rows = []
    kind = "-numbered" if args.numbered else ""
    for size in args.sizes:
        corpus = make_corpus(
            args.workdir / f"corpus{kind}-{size}mb.jsonl", size, numbered=args.numbered
        )
        cache = args.workdir / f"cache{kind}-{size}mb"
        if not args.keep_cache and args.only != "warm":
            shutil.rmtree(cache, ignore_errors=True)
        for cache_state in ("cold", "warm"):
            if args.only and cache_state != args.only:
                continue
            out = args.workdir / f"run{kind}-{size}mb-{cache_state}"
            result = run_child(corpus, out, cache, args.steps, args.extra)
            rows.append(row := {"size_mb": size, "cache": cache_state, **result})
            print(json.dumps(row), flush=True)
    if args.streaming:
        size = max(args.sizes)
        corpus = args.workdir / f"corpus{kind}-{size}mb.jsonl"
        cache = args.workdir / f"cache{kind}-{size}mb-streaming"
        shutil.rmtree(cache, ignore_errors=True)
        out = args.workdir / f"run-{size}mb-streaming"
        result = run_child(corpus, out, cache, args.steps, [*args.extra, "--streaming"])
        rows.append(row := {"size_mb": size, "cache": "streaming", **result})
        print(json.dumps(row), flush=True)
    print("\n| corpus | cache | prepared (s) | peak RSS (MiB) | first step (s) | tokens/s | wall (s) |"
          "\n|---|---|---|---|---|---|---|")  # fmt: skip
    cells = (("prepare_s", ".0f"), ("peak_rss_mib", ".0f"), ("first_step_s", ".1f"),
             ("tokens_per_s", ".0f"), ("wall_s", ".0f"))  # fmt: skip
    for r in rows:
        shown = ["-" if r[k] is None else format(r[k], f) for k, f in cells]
        print(f"| {r['size_mb']} MB | {r['cache']} | " + " | ".join(shown) + " |")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--sizes", type=int, nargs="+", default=None, metavar="MB", help="default 10 100 (--prefetch: 10)")  # fmt: skip
    add("--workdir", type=Path, default=Path("/tmp/minituring-data-scale"))
    add("--steps", type=int, default=None, help="default 20 (--prefetch: 60)")
    add("--only", choices=("cold", "warm"), default=None)
    add("--keep-cache", action="store_true", help="do not empty the cache first")
    add("--streaming", action="store_true", help="also run the largest corpus with --streaming")
    add("--numbered", action="store_true", help="every line ends in a distinct number")
    add("--prefetch", action="store_true", help="race --prefetch 0 against 2 instead")
    add("--corpus", type=Path, help="--prefetch: train on this text file instead")
    add("--torch-threads", type=int, help="--prefetch: OMP_NUM_THREADS for the trainer")
    add("--json", type=Path, default=None, help="also write the rows here")
    add("extra", nargs="*", help="more train.py flags, after --")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.sizes = args.sizes or ([10] if args.prefetch else [10, 100])
    args.steps = args.steps or (60 if args.prefetch else 20)
    rows = race_prefetch(args) if args.prefetch else scale(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
