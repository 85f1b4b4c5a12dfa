"""A development split carved from the embedded corpus's *training* side, for choosing a recipe
without looking at the held-out split that the race and the README report.

    python bench/dev_split.py --out dev
    python bench/quality.py --minutes 10 --skip-hf --pairs dev/train_pairs.jsonl \\
        --test-pairs dev/dev_pairs.jsonl --text dev/train_text.jsonl --test-text dev/dev_text.jsonl \\
        --ours-flags "--dropout 0.1"

Documents are split by a differently salted stable hash of the same near-duplicate group key the
held-out split uses (``data.corpus.group_key``); a development pair's docstring leaves the
training text too, so masked LM never reads a development summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.config import DataConfig  # noqa: E402
from data.corpus import docstring_pair, group_key, is_held_out  # noqa: E402
from data.raw import load_raw  # noqa: E402


def is_dev(text: str, fraction: float) -> bool:
    return is_held_out(group_key(text), fraction, salt=b"minituring/dev")


def split(texts, pairs, fraction: float):
    """(train texts, dev texts, train pairs, dev pairs) from the training side's texts and pairs."""
    train_texts, dev_texts = [], []
    for text in texts:
        (dev_texts if is_dev(text, fraction) else train_texts).append(text)
    dev_docs = {docstring_pair(t) for t in dev_texts} - {None}
    train_pairs, dev_pairs = [], []
    for pair in pairs:
        (dev_pairs if pair in dev_docs or is_dev(pair[0], fraction) else train_pairs).append(pair)
    # As the held-out split does: a development summary that is also a training target would
    # measure recall.
    targets = {s for _, s in train_pairs}
    dev_pairs = [p for p in dev_pairs if p[1] not in targets]
    return train_texts, dev_texts, train_pairs, dev_pairs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/dev_split.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the four jsonl files")
    p.add_argument("--fraction", type=float, default=0.05, help="share of documents for dev")
    args = p.parse_args(argv)
    raw = load_raw(DataConfig())
    texts = [str(t) for t in raw.train_texts]
    pairs = [(str(d), str(s)) for d, s in raw.train_pairs]
    train_texts, dev_texts, train_pairs, dev_pairs = split(texts, pairs, args.fraction)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train_text.jsonl", [{"text": t} for t in train_texts])
    write_jsonl(out / "dev_text.jsonl", [{"text": t} for t in dev_texts])
    for name, rows in (("train_pairs", train_pairs), ("dev_pairs", dev_pairs)):
        write_jsonl(out / f"{name}.jsonl", [{"document": d, "summary": s} for d, s in rows])
    print(f"{len(train_texts)} + {len(dev_texts)} texts, "
          f"{len(train_pairs)} + {len(dev_pairs)} pairs (train + dev) in {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
