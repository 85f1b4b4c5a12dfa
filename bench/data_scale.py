"""How data preparation scales with the corpus: memory, preparation time, warm start.

    python -m bench.data_scale                       # 10 MB and 100 MB, cold and warm cache
    python -m bench.data_scale --sizes 10 100 1000   # add 1 GB
    python -m bench.data_scale --sizes 1000 --only cold
    python -m bench.data_scale --sizes 100 1000 --streaming   # and --streaming on 1 GB

Each corpus is real text: the embedded corpus's documents repeated in a shuffled order until
the size is reached, one JSON object a line, written under ``--workdir`` (``/tmp`` by default,
never the repository). For each size the trainer runs twice as a child process,

    python train.py --train-text FILE --objectives masked_lm=1 --max-steps 20 --output-dir ...

first with an empty cache (cold: reading, tokenizer training, tokenization), then again with
the cache the first run left (warm). With ``--streaming`` the largest corpus also runs once
with ``--streaming`` (read, tokenized and packed as it trains; its cache holds only the
tokenizer, trained on the stream's first documents). Reported per run: the preparation time
the trainer prints, the child's peak resident memory (``os.wait4`` rusage of that child alone),
the time from the start of training (after imports) to the first finished step
(``summary.json``), and the trained tokens per second. The table comes
last. Times taken on a shared machine vary with its load; memory does not.
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


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> Path:
    """``size_mb`` MB of the embedded corpus's documents, shuffled and repeated (jsonl)."""
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
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size_mb * MB:
            order = list(range(len(docs)))
            rng.shuffle(order)
            for i in order:
                line = json.dumps({"text": docs[i]}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= size_mb * MB:
                    break
    os.replace(tmp, path)
    return path


_PREPARED = re.compile(r"prepared in (\d+(?:\.\d+)?)s")


def run_child(corpus: Path, out: Path, cache: Path, steps: int, extra: list[str], env=None) -> dict:
    """Train on ``corpus`` in a child process (``env``: more environment variables); what
    it measured."""
    flags = ["--train-text", str(corpus), "--objectives", "masked_lm=1", "--max-steps", str(steps)]
    try:
        s = run_train([*flags, *extra], out, env={**(env or {}), "MINITURING_CACHE": str(cache)})
    except Failed as err:
        raise SystemExit(f"{' '.join(flags)} failed: {err}") from None
    prepared = _PREPARED.search(Path(out.parent / f"{out.name}.log").read_text())
    logged = [m for m in read_metrics(out / "metrics.jsonl") if "tokens_per_s" in m]
    return {
        "wall_s": s["wall_s"],
        "prepare_s": float(prepared.group(1)) if prepared else None,
        "peak_rss_mib": s["peak_rss_mib"],
        "first_step_s": s["first_step_seconds"],
        "tokens_per_s": logged[-1]["tokens_per_s"] if logged else None,
        # Over the steps after the first log window (summary.json), not the last window:
        "data_wait": s["data_wait"],
        "timed_tokens_per_s": s["tokens_per_s"],
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], metavar="MB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minituring-data-scale"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", choices=("cold", "warm"), default=None)
    parser.add_argument("--keep-cache", action="store_true", help="do not empty the cache first")
    parser.add_argument(
        "--streaming", action="store_true", help="also run the largest corpus with --streaming"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("extra", nargs="*", help="more train.py flags, after --")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        corpus = make_corpus(args.workdir / f"corpus-{size}mb.jsonl", size)
        cache = args.workdir / f"cache-{size}mb"
        if not args.keep_cache and args.only != "warm":
            shutil.rmtree(cache, ignore_errors=True)
        for kind in ("cold", "warm"):
            if args.only and kind != args.only:
                continue
            out = args.workdir / f"run-{size}mb-{kind}"
            result = run_child(corpus, out, cache, args.steps, args.extra)
            row = {"size_mb": size, "cache": kind, **result}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.streaming:
        size = max(args.sizes)
        corpus = args.workdir / f"corpus-{size}mb.jsonl"
        cache = args.workdir / f"cache-{size}mb-streaming"
        shutil.rmtree(cache, ignore_errors=True)
        out = args.workdir / f"run-{size}mb-streaming"
        result = run_child(corpus, out, cache, args.steps, [*args.extra, "--streaming"])
        rows.append(row := {"size_mb": size, "cache": "streaming", **result})
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(
        "\n| corpus | cache | prepared (s) | peak RSS (MiB) | first step (s) | tokens/s | wall (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size_mb']} MB | {r['cache']} | {_fmt(r['prepare_s'], '.0f')} | "
            f"{r['peak_rss_mib']:.0f} | {_fmt(r['first_step_s'], '.1f')} | "
            f"{_fmt(r['tokens_per_s'], '.0f')} | {r['wall_s']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
