"""The validation split: carved from the training data (grouped, apart from the held-out split),
evaluated periodically, and the weights of its best evaluation kept as model.safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import paragraphs

from data.config import DataConfig
from data.corpus import build_default_corpus, group_key, validation_share
from data.raw import load_raw


def test_validation_share_has_a_floor_and_a_cap():
    assert validation_share(1000, 0.05) * 1000 == pytest.approx(100)  # floor: min(100, 10%)
    assert validation_share(200, 0.05) * 200 == pytest.approx(20)  # a tenth of a small set
    assert validation_share(4000, 0.05) * 4000 == pytest.approx(200)  # the fraction itself
    assert validation_share(100_000, 0.05) * 100_000 == pytest.approx(500)  # the cap
    assert validation_share(1000, 0) == validation_share(0, 0.05) == 0


def _rows(table) -> list:
    return list(table)


def test_user_data_split_is_disjoint_grouped_and_sized(tmp_path):
    """Training, validation and held-out rows partition the source; near-duplicates (the same
    text up to case and punctuation) share a side; a validation pair's summary is never a
    training summary."""
    docs = paragraphs()[:1200]
    # Near-duplicates: every tenth document again, shouted and with its punctuation changed.
    docs += [d.upper().replace(".", " !") for d in docs[::10]]
    text_file = tmp_path / "docs.txt"
    text_file.write_text("\n".join(docs) + "\n")
    pairs_file = tmp_path / "pairs.jsonl"
    pairs = [(d, f"summary {i % 1000}") for i, d in enumerate(docs)]  # summaries repeat
    pairs_file.write_text(
        "".join(json.dumps({"document": d, "summary": s}) + "\n" for d, s in pairs)
    )
    raw = load_raw(DataConfig(train_text=[str(text_file)], train_pairs=[str(pairs_file)]))

    train, val, held = (_rows(t) for t in (raw.train_texts, raw.val_texts, raw.eval_texts))
    assert sorted(train + val + held) == sorted(docs)
    assert validation_share(len(train) + len(val), 0.05) > 0
    assert 80 <= len(val) <= 200, len(val)  # the floor of about 100 of the ~1,300 training rows
    sides = {}
    for side, rows in (("train", train), ("val", val), ("eval", held)):
        for row in rows:
            assert sides.setdefault(group_key(row), side) == side, row[:60]

    train_p, val_p, held_p = (_rows(t) for t in (raw.train_pairs, raw.val_pairs, raw.eval_pairs))
    assert sorted(train_p + val_p + held_p) == sorted(pairs)
    assert val_p and not {s for _, s in val_p} & {s for _, s in train_p}
    assert not {d for d, _ in val_p} & {d for d, _ in held_p}


def test_embedded_corpus_sets_docstrings_aside_whole():
    corpus = build_default_corpus(eval_fraction=0.02, max_chars=1_500_000, val_fraction=0.05)
    assert corpus.val_texts and corpus.val_pairs
    train, val, held = map(set, (corpus.train_texts, corpus.val_texts, corpus.eval_texts))
    assert not train & val and not val & held and not train & held
    # A validation pair's summary is no training summary, and its docstring trains nothing.
    train_summaries = {s for _, s in corpus.train_pairs}
    assert not {s for _, s in corpus.val_pairs} & train_summaries
    for document, summary in corpus.val_pairs:
        assert not any(document in t and summary in t for t in corpus.train_texts)
    without = build_default_corpus(eval_fraction=0.02, max_chars=1_500_000)
    assert not without.val_texts and without.eval_texts == corpus.eval_texts


def test_validation_fraction_is_checked(tmp_path):
    import train
    from trainer.errors import TrainingError

    cfg = train.config_from_args(["--val-fraction", "1.5", "--output-dir", str(tmp_path)])
    with pytest.raises(TrainingError, match="--val-fraction must be in"):
        train.train(cfg)


def _unused(_: Path) -> None:  # keeps Path imported for the run tests below
    pass
