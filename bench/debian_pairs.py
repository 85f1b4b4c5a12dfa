"""Real document/summary pairs from a Debian or Ubuntu machine: each installed package's long
description (``/var/lib/dpkg/status``) as the document, its one-line synopsis as the summary.

    python -m bench.debian_pairs --out debian
    python -m bench.quality --minutes 10 --skip-mlm --pairs debian/train.jsonl \\
        --test-pairs debian/test.jsonl --text debian/corpus.jsonl

A fifth of the packages are held out as train.py holds out its split, so near-duplicates (a
library and its -dev package) fall on one side. For a generality check, never for a recipe.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from data.split import held_out_document

TEST_FRACTION, MIN_WORDS = 0.2, 8


def read_status(path: Path) -> list[tuple[str, str]]:
    """(long description, synopsis) of each package with a long description of MIN_WORDS or more."""
    pairs, synopsis, lines, field = [], None, [], None

    def close() -> None:
        # A lone "." line is a paragraph break in a Debian description: a line break here.
        joined = " ".join("\n" if line == "." else line for line in lines)
        document = re.sub(r" *\n *", "\n", joined).strip()
        if synopsis and len(document.split()) >= MIN_WORDS:
            pairs.append((document, synopsis))

    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip():
            if synopsis is not None:
                close()
            synopsis, lines, field = None, [], None
        elif line[0] in " \t":
            if field == "Description":
                lines.append(line.strip())
        else:
            field, _, value = line.partition(":")
            if field == "Description":
                synopsis = value.strip()
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.debian_pairs", description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--status", type=Path, default=Path("/var/lib/dpkg/status"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.status.is_file():
        raise SystemExit(f"{args.status}: no such file (a Debian or Ubuntu machine's package list)")
    train, test = [], {}
    for document, summary in read_status(args.status):
        if held_out_document(document, TEST_FRACTION):
            test.setdefault(document, summary)  # an identical description once
        else:
            train.append((document, summary))
    args.out.mkdir(parents=True, exist_ok=True)
    files = {"train.jsonl": [{"document": d, "summary": s} for d, s in train],
             "test.jsonl": [{"document": d, "summary": s} for d, s in test.items()],
             "corpus.jsonl": [{"text": d} for d, _ in train]}  # fmt: skip
    for name, rows in files.items():
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(train)} training and {len(test)} test pairs in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
