"""Data wait with and without the prefetching thread, side by side.

    python -m bench.prefetch                               # streamed, tiny preset, 60 steps
    python -m bench.prefetch --mapped --preset small --steps 20
    python -m bench.prefetch --torch-threads 1             # a core left spare for the thread
    python -m bench.prefetch --extra --device cuda         # on a GPU

Trains the same run (``train.py --objectives masked_lm=1`` on ``--size-mb`` MB of the embedded
corpus's documents, as ``bench/data_scale.py`` builds it) once with ``--prefetch 0`` (the step
draws its own batches) and once with ``--prefetch 2`` (a thread draws them ahead), each as a
child process after one warm-up run has filled the cache. Reported per run, from its
``summary.json`` (the steps after the first log window): the share of step time spent waiting
for data, and tokens/s; then the ratio of the two speeds. ``--streaming`` (the default here)
tokenizes and packs as it trains, so its data work per step is the largest.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bench.data_scale import make_corpus, run_child


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--size-mb", type=int, default=10)
    parser.add_argument("--corpus", type=Path, help="train on this text file instead")
    parser.add_argument("--mapped", action="store_true", help="the mapped cache, not --streaming")
    parser.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS for the trainer")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minituring-bench-prefetch"))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags")
    args = parser.parse_args(argv)

    corpus = args.corpus or make_corpus(
        args.workdir / f"corpus-{args.size_mb}mb.jsonl", args.size_mb
    )
    cache = args.workdir / "cache"
    flags = ["--preset", args.preset, "--log-every", "10", "--eval-every", "0", "--no-progress"]
    flags += ["--rouge-samples", "0", "--eval-batches", "1"]
    flags += ([] if args.mapped else ["--streaming"]) + args.extra
    env = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {}
    run_child(corpus, args.workdir / "warm-up", cache, 2, flags, env=env)  # fills the cache
    results = []
    for depth in (0, 2):
        out = args.workdir / f"prefetch-{depth}"
        result = run_child(
            corpus, out, cache, args.steps, [*flags, "--prefetch", str(depth)], env=env
        )
        results.append({"prefetch": depth, **result})
        shutil.rmtree(out, ignore_errors=True)

    kind = "mapped" if args.mapped else "streamed"
    threads = args.torch_threads or "default"
    print(f"\n{kind}, --preset {args.preset}, {args.steps} steps, torch threads: {threads}")
    print("| --prefetch | data wait (% of step) | tokens/s |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['prefetch']} | {100 * r['data_wait']:.2f} | {r['timed_tokens_per_s']:,.0f} |")
    speedup = results[1]["timed_tokens_per_s"] / results[0]["timed_tokens_per_s"]
    print(f"tokens/s with the thread / without: {speedup:.3f}")
    return results


if __name__ == "__main__":
    main()
