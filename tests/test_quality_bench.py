"""bench/quality.py: the scores and baselines, the cloze items, the HF contestants' shapes and
schedule, and the whole race at a tiny size; bench/debian_pairs.py reads a package list."""

from __future__ import annotations

import json
import math

import pytest

from bench import debian_pairs as debian
from bench import hf, quality

TINY = [
    "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--ffn-size", "64",
    "--seq-len", "32", "--vocab-size", "400",
]  # fmt: skip


# ---------------------------------------------------------------------------- scores


def test_rouge_is_rouge_score_mean_times_100():
    from rouge_score import rouge_scorer

    preds = ["the cats are running fast", "a parser for config files"]
    refs = ["the cat runs fast", "parse the configuration file"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = quality.rouge(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = (
            100
            * sum(scorer.score(r, p)[key].fmeasure for p, r in zip(preds, refs, strict=True))
            / 2
        )
        assert got[key] == pytest.approx(expected)
    assert got["rouge1"] > 0 and quality.rouge(refs, refs)["rougeL"] == pytest.approx(100)


def test_oracle_is_the_best_window_and_beats_lead():
    doc = "This module holds helpers. It parses the config file and returns a dict of options."
    ref = "Parse the config file and return options."
    n = len(ref.split())
    assert quality.lead(doc, n) == "This module holds helpers. It parses the"
    best = quality.oracle(doc, ref)
    assert best == "It parses the config file and returns"  # the first of two equal windows
    assert len(best.split()) == n
    scores = {name: quality.rouge([text], [ref])["rougeL"] for name, text in
              (("lead", quality.lead(doc, n)), ("oracle", best))}  # fmt: skip
    assert scores["oracle"] > scores["lead"]
    # A document shorter than the reference is its own only window.
    assert quality.oracle("two words", ref) == "two words"
    rows = quality.baselines([(doc, ref)])
    assert list(rows.values())[1] == [quality.lead(doc, 10)]


def test_cloze_items_mask_one_single_token_word(tokenizer):
    texts = [
        "Return the absolute value of a number, as a float or an integer.",
        "Short",
        "x = 1; y = 2",  # no letters-only word after the first
        " ".join(f"word{i}" for i in range(60)) + " tail",  # its only candidate is past 40 words
    ]

    def fits(word):
        return quality.single_token(tokenizer, word)

    items = quality.cloze_items(texts, fits, seed=0)
    assert len(items) == 1
    masked, word = items[0]
    assert masked.count(quality.MASK) == 1 and word.isalpha() and fits(word)
    assert masked.replace(quality.MASK, word) == texts[0]
    assert not masked.startswith(quality.MASK)
    assert quality.cloze_items(texts, fits, seed=0) == items  # deterministic
    picked = {quality.cloze_items(texts[:1], fits, seed=s)[0][1] for s in range(8)}
    assert len(picked) > 1  # the seed chooses the word
    assert len(quality.cloze_items(texts * 3, fits, seed=0, limit=2)) == 2
    assert quality.accuracy(["a", "b"], ["a", "c"]) == 50


# ---------------------------------------------------------------------------- HF side


def test_hf_models_are_about_our_size(texts, tokenizer):
    from model.config import PRESETS
    from model.tokenizer import model_config
    from model.transformer import MiniTuringModel

    tok = hf.train_tokenizer(texts, 400)
    assert tok.mask_token == "<mask>" and len(tok) <= 400
    # <mask> takes the space before it, like a word in its slot.
    with_mask = tok("the <mask> value")["input_ids"]
    assert with_mask[0] == tok.bos_token_id and with_mask[-1] == tok.eos_token_id
    assert len(with_mask) == len(tok("the value")["input_ids"]) + 1
    shape = {**PRESETS["tiny"](), "max_positions": 512}
    ours = MiniTuringModel(
        model_config(tokenizer, **{k: shape[k] for k in ("hidden_size", "num_layers", "num_heads",
                                                     "ffn_size")})
    )  # fmt: skip
    ours = sum(math.prod(p.shape) for p in ours.parameters())
    bart, bert = hf.build("bart", shape, tok, 0), hf.build("bert", shape, tok, 0)
    assert hf.bart_layers(4) == (2, 2) and hf.bart_layers(1) == (1, 1)
    assert bart.config.encoder_layers == 2 and bart.config.d_model == 256
    assert bert.config.num_hidden_layers == 4 and bert.config.intermediate_size == 1024
    for model in (bart, bert):
        assert 0.8 < model.num_parameters() / ours < 1.5
    bart, bert = (
        hf.build("bart", shape, tok, 0, 0.1, 0.0),
        hf.build("bert", shape, tok, 0, 0.1, 0.0),
    )
    assert (bart.config.dropout, bart.config.attention_dropout) == (0.1, 0.0)
    assert (bert.config.hidden_dropout_prob, bert.config.attention_probs_dropout_prob) == (0.1, 0)


def test_hf_schedule_is_train_py_schedule():
    assert hf.lr_factor(0, 1000) == pytest.approx(1 / 100)
    assert hf.lr_factor(99, 1000) == pytest.approx(1.0)
    assert hf.lr_factor(0, 50) == pytest.approx(1 / 5)  # warm-up: a tenth of a short run
    assert hf.lr_factor(1000, 1000) == pytest.approx(0.1)
    assert hf.lr_factor(550, 1000) == 1.0  # stable
    assert hf.lr_factor(900, 1000) == pytest.approx(0.1 + 0.9 * (1 - 0.5**0.5))  # mid-decay


def test_our_command_is_train_py_with_its_defaults():
    args = quality.build_parser().parse_args(["--pairs", "p.jsonl", "--test-pairs", "t.jsonl"])
    cmd = quality.our_flags(args, 90)
    assert cmd[cmd.index("--time-budget") + 1] == "90"
    assert "--max-steps" not in cmd  # a budget alone: the defaults a user gets
    assert "--train-pairs" in cmd and "--eval-pairs" in cmd
    assert not any(f"--{name.replace('_', '-')}" in cmd for name in quality.SHAPE_FLAGS)
    with pytest.raises(SystemExit):
        quality.main(["--test-pairs", "t.jsonl"])


def test_ours_flags_reach_train_py_last():
    args = quality.build_parser().parse_args(["--ours-flags", "--dropout 0.1 --lr '3e-3'"])
    assert quality.our_flags(args, 90)[-4:] == ["--dropout", "0.1", "--lr", "3e-3"]


# ---------------------------------------------------------------------------- the race


@pytest.mark.slow  # about 35 s on an idle two-core machine, minutes on a busy one
def test_race_runs_end_to_end(tmp_path, corpus_files, capsys):
    text_file, pairs = corpus_files
    out = tmp_path / "quality.json"
    argv = ["--minutes", "0.05", "--test-limit", "4", "--text", str(text_file),
            "--pairs", str(pairs), "--json", str(out), *TINY]  # fmt: skip
    assert quality.main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    header = printed.index(next(x for x in printed if x.startswith("| contestant")))
    assert "python -m bench.quality" in printed[header - 1]  # machine, date, command above
    assert all(x.startswith("|") for x in printed[header:])  # the table comes last
    report = json.loads(out.read_text())
    rows = {r["name"].split(" (")[0].split(" 0.")[0]: r for r in report["rows"]}
    assert {"lead-10", "ours train.py", "HF BART", "HF BERT"} <= set(rows)
    for name in ("ours train.py", "HF BART"):
        assert rows[name]["steps"] > 0 and 0 <= rows[name]["rougeL"] <= 100
    for name in ("ours train.py", "HF BERT"):
        assert 0 <= rows[name]["cloze"] <= 100
    assert rows["HF BART"]["train_seconds"] < 3 + 5  # stopped by the budget (3 s)


def test_hf_side_gets_our_regularisation_unless_told_otherwise():
    from trainer.config import ModelOptions, OptimConfig

    ours = ModelOptions()
    attention = ours.dropout if ours.attention_dropout is None else ours.attention_dropout
    args = quality.build_parser().parse_args([])
    assert quality.hf_regularisation(args) == {
        "dropout": ours.dropout,
        "attention_dropout": attention,
        "label_smoothing": OptimConfig().label_smoothing,
    }
    args = quality.build_parser().parse_args(
        ["--hf-dropout", "0.2", "--hf-attention-dropout", "0.05", "--bart-label-smoothing", "0.3"]
    )
    assert quality.hf_regularisation(args) == {
        "dropout": 0.2,
        "attention_dropout": 0.05,
        "label_smoothing": 0.3,
    }


def test_debian_pairs_are_long_descriptions_and_synopses(tmp_path):
    status = tmp_path / "status"
    status.write_text(
        "Package: alpha\nStatus: install ok installed\nDescription: tool for alpha things\n"
        " Alpha does one thing and does it well, on every\n machine it runs on.\n .\n"
        " A second paragraph.\nHomepage: https://example.org\n\n"
        "Package: beta\nDescription: too short\n Two words.\n\n"
        "Package: gamma\nDescription: no long description\n"
    )
    assert debian.read_status(status) == [
        (
            "Alpha does one thing and does it well, on every machine it runs on.\n"
            "A second paragraph.",
            "tool for alpha things",
        )
    ]
    assert debian.main(["--status", str(status), "--out", str(tmp_path / "out")]) == 0
    rows = [
        json.loads(line)
        for name in ("train.jsonl", "test.jsonl")
        for line in (tmp_path / "out" / name).read_text().splitlines()
    ]
    assert rows == [
        {"document": debian.read_status(status)[0][0], "summary": "tool for alpha things"}
    ]
