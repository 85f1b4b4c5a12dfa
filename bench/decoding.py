"""Decoding options of ``summarize`` chosen on pairs: one trained run folder, every combination
of length penalty and n-gram blocking (beam search), ROUGE on the given pairs.

    python bench/decoding.py RUN --pairs dev/dev_pairs.jsonl
    python bench/decoding.py RUN --pairs dev/dev_pairs.jsonl --length-penalty 0.6 1 1.5 \\
        --no-repeat-ngram 0 2 3 --limit 400

Choose on a development split (``bench/dev_split.py``), never on the split a result is
reported on. Each row is scored against the first (the run's own ``generation_config.json``):
the mean per-document ROUGE-L difference with its paired standard error, which measures the
sampling of the documents only. The table is printed last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "bench"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from quality import ROUGE_KEYS, rouge_per_document  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/decoding.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", help="a trained run folder")
    parser.add_argument(
        "--pairs", nargs="+", required=True, help="document/summary pairs to score on"
    )
    parser.add_argument("--length-penalty", type=float, nargs="+", default=[0.6, 1.0, 1.5])
    parser.add_argument("--no-repeat-ngram", type=int, nargs="+", default=[0, 2, 3])
    parser.add_argument("--num-beams", type=int, default=None, help="default: the run's")
    parser.add_argument("--limit", type=int, default=None, help="at most this many pairs")
    parser.add_argument("--json", metavar="OUT", help="also write the rows here")
    return parser


def load_pairs(sources: list[str], limit: int | None) -> list[tuple[str, str]]:
    """The pairs as train.py reads them (the same sources, columns and checks)."""
    from data.config import DataConfig
    from data.raw import read_pairs

    pairs = read_pairs(sources, DataConfig())
    return pairs[:limit] if limit else pairs


def paired(first: list[dict], other: list[dict]) -> tuple[float, float]:
    """Mean per-document ROUGE-L difference and its standard error."""
    diffs = [b["rougeL"] - a["rougeL"] for a, b in zip(first, other, strict=True)]
    if len(diffs) < 2:
        return statistics.fmean(diffs), float("nan")
    return statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import model

    lm = model.load(args.run)
    pairs = load_pairs(args.pairs, args.limit)
    if not pairs:
        raise SystemExit(f"no pairs in {' '.join(args.pairs)}")
    documents, references = [d for d, _ in pairs], [s for _, s in pairs]
    own = dict(lm.generation)
    beams = args.num_beams or own.get("num_beams", 4)
    print(f"[decoding] {args.run}: {len(pairs)} pairs; the run's options {json.dumps(own)}")
    grid = [(None, None)] + list(itertools.product(args.length_penalty, args.no_repeat_ngram))
    rows, first = [], None
    for penalty, ngram in grid:
        start = time.perf_counter()
        summaries = lm.summarize(
            documents, num_beams=beams, length_penalty=penalty, no_repeat_ngram_size=ngram
        )
        seconds = time.perf_counter() - start
        scores = rouge_per_document(summaries, references)
        first = first or scores
        diff, error = paired(first, scores)
        row = {
            "length_penalty": own.get("length_penalty") if penalty is None else penalty,
            "no_repeat_ngram_size": own.get("no_repeat_ngram_size") if ngram is None else ngram,
            "run's own": penalty is None,
            **{k: statistics.fmean(s[k] for s in scores) for k in ROUGE_KEYS},
            "vs_own": diff,
            "paired_se": error,
            "mean_words": statistics.fmean(len(s.split()) for s in summaries),
            "seconds": seconds,
        }
        rows.append(row)
        print(f"[decoding] {json.dumps(row)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nbeam {beams}, {len(pairs)} pairs, ROUGE F x100 (rouge-score, stemmed)")
    print(
        "| length penalty | no repeat n-gram | ROUGE-1 | ROUGE-2 | ROUGE-L | vs own (s.e.) | words |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        own_mark = " (the run's)" if r["run's own"] else ""
        print(
            f"| {r['length_penalty']:g}{own_mark} | {r['no_repeat_ngram_size']} | "
            f"{r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | "
            f"{r['vs_own']:+.2f} ({r['paired_se']:.2f}) | {r['mean_words']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
