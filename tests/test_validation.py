"""The validation split: carved from the training data (grouped, apart from the held-out split),
evaluated periodically, and the weights of its best evaluation kept as model.safetensors, unless
at the end that evaluation does not beat the last weights' by more than 2 paired standard
errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import metrics, paragraphs, train_flags

from data.config import DataConfig
from data.corpus import build_default_corpus
from data.raw import load_raw
from data.split import group_key, validation_share


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


# ---------------------------------------------------------------------------- the kept weights

# The validation masked-LM loss each evaluation reports (lower is better): step 6 is the best.
SCORES = {3: 3.0, 6: 1.0, 9: 2.0, 12: 4.0}
# Its per-batch losses: the score plus these, the same at every step unless a test says
# otherwise (``scored["spread"]``), so that step 6 beats step 12 by 3 with no noise at all.
STEADY = [-0.5, 0.0, 0.5, 0.0]
KEPT_FLAGS = ["--objectives", "masked_lm=1", "--max-steps", "12", "--eval-every", "3"]
KEPT_FLAGS += ["--save-every", "3", "--keep-checkpoints", "5", "--log-every", "1"]


@pytest.fixture
def scored(monkeypatch):
    """Validation evaluations report SCORES and per-batch samples around them; the held-out one
    records the weights it saw."""
    from trainer import loop

    real, seen = loop.run_evaluation, {"spread": {}}

    def run_evaluation(run, progress, split="eval", model=None):
        results = real(run, progress, split, model)
        if split == "val":
            step = run.state.step
            results["masked_lm/loss"] = SCORES[step]
            spread = seen["spread"].get(step, STEADY)
            results.samples["masked_lm/loss"] = [[SCORES[step] + e for e in spread]]
        else:
            seen["held-out"] = (model or run.model).state_dict()
        return results

    monkeypatch.setattr(loop, "run_evaluation", run_evaluation)
    monkeypatch.setattr(loop, "write_training_curves", lambda folder, **_: None)
    return seen


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_best_evaluations_weights_are_kept(tmp_path, corpus_files, scored):
    import train
    from trainer.evaluate import SELECTION_RULE

    out = tmp_path / "run"
    train.train(train.config_from_args(train_flags(out, corpus_files, *KEPT_FLAGS)))
    summary = json.loads((out / "summary.json").read_text())
    kept = summary["kept"]
    assert kept["step"] == 6 and kept["metric"] == "val/masked_lm/loss" and kept["value"] == 1.0
    assert kept["rule"] == SELECTION_RULE and summary["steps"] == 12
    assert kept["why"] == (
        "the best val/masked_lm/loss of the evaluations: it beats the last weights' (4) by "
        "3 +- 0, more than 2 standard errors"
    )
    at = {step: _weights(out / "checkpoints" / f"step-{step:07d}" / "model.safetensors")
          for step in (6, 12)}  # fmt: skip
    assert _same(_weights(out / "model.safetensors"), at[6])
    assert not _same(at[6], at[12])  # the last checkpoint, for --resume, is step 12's
    # The final held-out evaluation scored the kept weights.
    assert _same({k: v.detach().cpu() for k, v in scored["held-out"].items()}, at[6])
    records = metrics(out)
    assert [r["step"] for r in records if "val/masked_lm/loss" in r] == [3, 6, 9, 12]
    assert [r["step"] for r in records if "eval/masked_lm/loss" in r] == [12]


def test_the_last_weights_are_kept_unless_an_earlier_evaluation_beats_them_clearly(
    tmp_path, corpus_files, scored
):
    """Step 6 still leads the last evaluation by 3, but the per-batch differences now vary
    (0, -6.5, 1, -6.5: a paired standard error of 2.03), so the lead is under 2 standard
    errors: the last weights are kept, and the held-out data scored with them."""
    import train

    scored["spread"][12] = [-3.5, 3.5, -3.5, 3.5]
    out = tmp_path / "run"
    train.train(train.config_from_args(train_flags(out, corpus_files, *KEPT_FLAGS)))
    kept = json.loads((out / "summary.json").read_text())["kept"]
    assert kept["step"] == 12 and kept["metric"] == "val/masked_lm/loss" and kept["value"] == 4.0
    assert kept["why"] == (
        "the last weights: the best earlier evaluation (step 6, 1) leads them by 3 +- 2.03, "
        "not more than 2 standard errors"
    )
    assert "samples" not in kept
    last = _weights(out / "checkpoints" / "step-0000012" / "model.safetensors")
    assert _same(_weights(out / "model.safetensors"), last)
    assert _same({k: v.detach().cpu() for k, v in scored["held-out"].items()}, last)


def test_paired_standard_error():
    from trainer.keep import paired_se

    assert paired_se([[1.0, 2.0, 3.0]], [[0.0, 1.0, 2.0]]) == 0.0  # a constant difference
    # Differences 1, -1 (variance 2, mean over 2: s.e. 1); two groups: sqrt(1 + 1) / 2.
    assert paired_se([[1.0, -1.0]], [[0.0, 0.0]]) == pytest.approx(1.0)
    assert paired_se([[1.0, -1.0], [1.0, -1.0]], [[0.0, 0.0]] * 2) == pytest.approx(2**0.5 / 2)
    # Values that do not pair: none.
    assert paired_se([], []) is None
    assert paired_se([[1.0, 2.0]], [[1.0, 2.0, 3.0]]) is None
    assert paired_se([[1.0]], [[2.0]]) is None
    assert paired_se([[1.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]]) is None


def test_a_resumed_run_keeps_choosing_as_the_uninterrupted_one(tmp_path, corpus_files, scored):
    """Stopped at step 7 (after the best evaluation, step 6) and resumed: the kept step comes
    back with the state, and the kept weights with the checkpoint, even when a later
    evaluation of the abandoned run had replaced RUN/model.safetensors."""
    from test_resume import run_until_signal

    import train

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train.train(train.config_from_args(train_flags(straight, corpus_files, *KEPT_FLAGS)))
    assert run_until_signal(train_flags(stopped, corpus_files, *KEPT_FLAGS), 7) != 0
    state = json.loads((stopped / "checkpoints" / "step-0000007" / "state.json").read_text())
    assert state["kept"]["step"] == 6
    # As if the stopped run had gone on and kept other weights before it died.
    shutil.copyfile(stopped / "checkpoints" / "step-0000007" / "model.safetensors",
                    stopped / "model.safetensors")  # fmt: skip
    train.train(train.config_from_args(["--resume", str(stopped)]))
    kept = json.loads((stopped / "summary.json").read_text())["kept"]
    assert kept == json.loads((straight / "summary.json").read_text())["kept"]
    assert kept["step"] == 6
    assert _same(_weights(stopped / "model.safetensors"), _weights(straight / "model.safetensors"))


def test_without_evaluations_the_last_weights_are_kept(tiny_run):
    """--eval-every 0 (the tiny test runs): as before validation, the last weights."""
    kept = json.loads((tiny_run / "summary.json").read_text())["kept"]
    assert kept == {"step": 12, "why": "the last weights: no periodic evaluation (--eval-every 0)"}
    last = tiny_run / "checkpoints" / "step-0000012" / "model.safetensors"
    assert _same(_weights(tiny_run / "model.safetensors"), _weights(last))
