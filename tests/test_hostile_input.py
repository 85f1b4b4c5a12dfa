"""Hostile and messy input, end to end: through ``train.main`` (which turns every data and
configuration problem into one ``error: ...`` line naming the source, the record and what was
expected) and through the inference API. The readers' own details are in test_sources.py;
here each case goes the whole way, from the command line to the message or to a trained run.
"""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
from conftest import TINY_FLAGS

import model as api
import train
from data.batching import MixtureLoader
from trainer import prepare

pytestmark = pytest.mark.usefixtures("without_plot")


def main_error(argv: list[str]) -> str:
    """Run the CLI, expecting it to refuse; returns its one-line message."""
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    assert "\n" not in message.strip() and "Traceback" not in message
    return message


def run_flags(tmp_path, *sources: str) -> list[str]:
    return TINY_FLAGS + ["--output-dir", str(tmp_path / "run"), "--max-steps", "2", *sources]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---------------------------------------------------------------------------- bad data


def _jsonl(tmp_path, name, records):
    return write_jsonl(tmp_path / name, records)


def esc(path) -> str:
    return re.escape(str(path))


def _cases(tmp_path, texts):
    """name -> (flags naming the bad source, pattern the message must contain)."""
    good = [{"text": t} for t in texts[:20]]
    pairs = [{"document": t, "summary": t[:40]} for t in texts[:20]]
    d = tmp_path
    (d / "empty.txt").write_text("")
    (d / "empty-folder").mkdir()
    (d / "blank.txt").write_text("  \n\t\n   \n")
    (d / "latin1.txt").write_bytes(b"first line\nsecond line\ncaf\xe9 au lait\n")
    (d / "binary.dat").write_bytes(bytes(range(256)) * 64)
    (d / "unsupported").mkdir()
    (d / "unsupported" / "paper.pdf").write_bytes(b"%PDF-1.4")
    (d / "header.csv").write_text("title,body\na,b\n")
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts[:5]}), d / "body.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), d / "numbers.parquet")
    datasets.Dataset.from_dict({"body": texts[:5]}).save_to_disk(str(d / "saved"))
    (d / "list.json").write_text(json.dumps([*good[:2], "just a string"]))
    bad_json = d / "bad.jsonl"
    bad_json.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n{oops\n")
    return {
        "empty file": (["--train-text", str(d / "empty.txt")],
                       f"no documents found in {esc(d / 'empty.txt')} \\(skipped 1 empty file\\)"),
        "empty folder": (["--train-text", str(d / "empty-folder")],
                         f"{esc(d / 'empty-folder')}: folder holds no data files"),
        "whitespace only": (["--train-text", str(d / "blank.txt")], "no documents found in"),
        "not UTF-8": (["--train-text", str(d / "latin1.txt")],
                      f"{esc(d / 'latin1.txt')}, line 3 \\(byte offset 26\\): cannot decode as utf-8"),
        "binary file": (["--train-text", str(d / "binary.dat")],
                        f"{esc(d / 'binary.dat')}: looks like a binary file"),
        "only unsupported files": (["--train-text", str(d / "unsupported")],
                                   "folder holds no data files"),
        "misnamed text column": (
            ["--train-text", _jsonl(d, "body.jsonl", [{"body": "x"}])],
            "body.jsonl, line 1: no column 'text' \\(columns present: 'body'\\); "
            "name the right column with --text-column"),
        "misnamed csv column": (["--train-text", str(d / "header.csv")],
                                "header.csv, header \\(line 1\\): no column 'text'"),
        "misnamed parquet column": (["--train-text", str(d / "body.parquet")],
                                    "body.parquet, schema: no column 'text'"),
        "misnamed dataset column": (["--train-text", str(d / "saved")],
                                    "saved, features: no column 'text'"),
        "misnamed pair column": (
            ["--train-pairs", _jsonl(d, "pairs.jsonl", [{"doc": "a", "summary": "b"}])],
            "no column 'document' .* --document-column"),
        "jsonl line not JSON": (["--train-text", str(bad_json)],
                                "bad.jsonl, line 3: not valid JSON"),
        "jsonl line not an object": (
            ["--train-text", _jsonl(d, "list.jsonl", [*good[:2], ["a", "list"]])],
            "list.jsonl, line 3: expected a JSON object"),
        "json list with a non-object": (
            ["--train-text", str(d / "list.json")],
            "list.json, record index 2: expected a JSON object",
        ),
        "mixed types in a column": (
            ["--train-text", _jsonl(d, "mixed.jsonl", [*good[:3], {"text": 42}])],
            "mixed.jsonl, line 4: column 'text' holds a int \\(42\\); expected text"),
        "numbers in a parquet column": (["--train-text", str(d / "numbers.parquet")],
                                        "numbers.parquet, row index 0: column 'text' holds a int"),
        "plain text as pairs": (["--train-pairs", str(d / "latin1.txt")],
                                "a plain text file holds no \\(document, summary\\) pairs"),
        "only empty summaries": (
            ["--train-pairs", _jsonl(d, "nosum.jsonl", [{**p, "summary": " "} for p in pairs])],
            "no \\(document, summary\\) pairs found in .*skipped 20 empty summaries"),
        "garbage tokenizer": (
            ["--train-text", _jsonl(d, "ok.jsonl", good), "--tokenizer", str(d / "latin1.txt")],
            "latin1.txt is not a valid tokenizer.json"),
    }  # fmt: skip


CASE_NAMES = [
    "empty file", "empty folder", "whitespace only", "not UTF-8", "binary file",
    "only unsupported files", "misnamed text column", "misnamed csv column",
    "misnamed parquet column", "misnamed dataset column", "misnamed pair column",
    "jsonl line not JSON", "jsonl line not an object", "json list with a non-object",
    "mixed types in a column",
    "numbers in a parquet column", "plain text as pairs", "only empty summaries",
    "garbage tokenizer",
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, texts):
    return _cases(tmp_path_factory.mktemp("bad"), texts)


def test_every_case_is_listed(bad_sources):
    assert sorted(bad_sources) == sorted(CASE_NAMES)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_data_is_one_clear_error(tmp_path, bad_sources, case):
    source_flags, pattern = bad_sources[case]
    message = main_error(run_flags(tmp_path, *source_flags))
    assert re.search(pattern, message), message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_documents_and_summaries_are_skipped_and_counted(tmp_path, texts, caplog):
    docs = [{"text": t if i % 5 else "   "} for i, t in enumerate(texts[:200])]
    pairs = [{"document": t, "summary": t[:50] if i % 4 else ""} for i, t in enumerate(texts[:80])]
    text_file = write_jsonl(tmp_path / "docs.jsonl", docs)
    pair_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    with caplog.at_level(logging.WARNING):
        train.main(run_flags(tmp_path, "--train-text", text_file, "--train-pairs", pair_file))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{text_file}: skipped 40 empty documents" in warnings
    assert f"{pair_file}: skipped 20 empty summaries" in warnings
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_text_too_short_for_one_block_is_named(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words\nand a few more\n")
    message = main_error(
        run_flags(tmp_path, "--train-text", str(short), "--eval-text", str(short))
        + ["--objectives", "masked_lm=1"]
    )
    assert "objective masked_lm has no training examples" in message
    assert "fewer tokens than one block of --seq-len" in message


def test_text_without_any_two_sentence_document(tmp_path, texts, caplog):
    titles = tmp_path / "titles.txt"
    titles.write_text("".join(t.split(".")[0].strip() + "\n" for t in texts[:200]))
    # Asked for explicitly, the objective without examples is an error naming it...
    message = main_error(
        run_flags(tmp_path, "--train-text", str(titles))
        + ["--objectives", "masked_lm=1,gap_summary=1"]
    )
    assert "gap_summary has no training examples" in message
    # ...while "auto" (every objective with data) leaves it out and trains the rest.
    out = tmp_path / "auto"
    train.main(
        TINY_FLAGS + ["--train-text", str(titles), "--output-dir", str(out), "--max-steps", "2"]
    )
    assert "gap_summary has no training examples; left out" in caplog.text
    assert (out / "model.safetensors").is_file()


def test_long_documents_are_split_and_long_pairs_truncated(tmp_path, texts, monkeypatch):
    """A 1.4M-character line is split into documents of at most 1M characters (at whitespace);
    sources and targets longer than --source-len / --target-len are truncated at the end, so
    no batch exceeds the limits."""
    words = " ".join(texts).split()
    line = " ".join(words[i % len(words)] for i in range(250_000))
    assert len(line) > 1_400_000
    text_file = tmp_path / "one-line.txt"
    text_file.write_text(line + "\n")
    long_pairs = [{"document": " ".join(texts[i : i + 40]), "summary": " ".join(texts[i : i + 5])}
                  for i in range(0, 200, 4)]  # fmt: skip
    pair_file = write_jsonl(tmp_path / "long.jsonl", long_pairs)
    seen = []

    class Watching(MixtureLoader):
        def next_batch(self):
            name, batch = super().next_batch()
            real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).sum(1)
            seen.append((name, tuple(batch["input_ids"].shape), int(real.max())))
            return name, batch

    out = tmp_path / "run"
    flags = run_flags(tmp_path, "--train-text", str(text_file), "--train-pairs", pair_file)
    # (gap_summary left out: see test_text_without_any_two_sentence_document)
    objectives = ["--objectives", "masked_lm=1,summarize=1"]
    train.main(flags + ["--max-steps", "12", *objectives], make_loader=Watching)
    config = json.loads((out / "config.json").read_text())["training"]["data"]
    assert {name for name, _, _ in seen} == {"masked_lm", "summarize"}
    for name, (_, length), _ in seen:
        if name == "masked_lm":
            assert length == 32
        else:
            assert length <= config["source_len"] + config["target_len"]
    # Truncated, not dropped: [CLS] + 62 source tokens + [SEP], then 15 target tokens (the
    # label sequence adds the final [SEP]).
    assert any(name == "summarize" and longest == 64 + 15 for name, _, longest in seen)


@pytest.mark.slow
def test_a_hundred_megabyte_single_line(tmp_path, corpus_files, tokenizer, capsys):
    """Read through the whole CLI: cut into 1M-character documents, held out by hash, no
    giant string downstream. (Only the pairs are tokenized here: tokenizing 100 MB is a few
    minutes of honest work on a laptop, not a robustness question.)"""
    big = tmp_path / "big.txt"
    piece = "lorem ipsum dolor sit amet " * 40_000
    with open(big, "w") as f:
        for _ in range(100_000_000 // len(piece) + 1):
            f.write(piece)
    assert big.stat().st_size > 100_000_000
    tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    _, pairs = corpus_files
    train.main(
        run_flags(tmp_path, "--train-text", str(big), "--train-pairs", str(pairs))
        + ["--tokenizer", str(tmp_path / "tokenizer.json"), "--objectives", "summarize=1"]
    )
    data_line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data:"))
    texts = int(data_line.split(": ")[2].split()[0])
    held = int(data_line.split("held out ")[1].split()[0])
    # One line of 100 MB = documents of at most 1M characters, cut at whitespace.
    expected = math.ceil(big.stat().st_size / 1_000_000)
    assert expected <= texts + held <= expected + 1


def test_a_line_without_whitespace_trains(tmp_path, texts):
    """No whitespace to cut at: documents are cut hard at 1M characters, and a 1M-character
    "word" tokenizes and trains like anything else."""
    blob = tmp_path / "blob.txt"
    blob.write_text("ab1" * 400_000 + "\n" + "\n".join(texts[:100]) + "\n")
    train.main(run_flags(tmp_path, "--train-text", str(blob)) + ["--objectives", "masked_lm=1"])
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


# ---------------------------------------------------------------------------- bad flags


FLAG_CASES = [
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--eval-every", "-5"], "--eval-every must be >= 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be >= 1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio must be in \\[0, 1\\]"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--dropout", "1.5"], "--dropout must be in \\[0, 1\\)"),
    (["--label-smoothing", "1"], "--label-smoothing must be in \\[0, 1\\)"),
    (["--source-mask-rate", "1"], "--source-mask-rate must be in \\[0, 1\\)"),
    (["--beta1", "1"], "--beta1 and --beta2 must be in \\[0, 1\\)"),
    (["--hidden-size", "0"], "--hidden-size must be >= 1"),
    (["--num-layers", "0"], "--num-layers must be >= 1"),
    (["--num-heads", "3"], "hidden_size \\(32\\) must be divisible by num_heads \\(3\\)"),
    (["--eval-fraction", "1"], "--eval-fraction must be in \\[0, 1\\)"),
    (
        ["--position", "learned", "--seq-len", "4096"],
        "--seq-len 4096 is larger than the model supports",
    ),
    (
        ["--position", "learned", "--source-len", "100", "--target-len", "100"],
        "exceeds --max-positions 128",
    ),
    (["--vocab-size", "10"], "vocabulary size 10 is too small: bpe needs more than 262"),
    (["--objectives", "masked_lm=0"], "at least one objective needs a weight > 0"),
    (["--objectives", "masked_lm=-1"], "weight of masked_lm must be a finite number >= 0"),
    (["--objectives", "masked_lm=inf"], "weight of masked_lm must be a finite number >= 0"),
    (["--objectives", "masked_lm=lots"], "weight of masked_lm must be a number"),
    (["--objectives", "summarize=1"], "objective summarize needs document/summary pairs"),
    (["--objectives", "translate=1"], "unknown objective 'translate'"),
    (["--tokenizer-kind", "sentencepiece"], "unknown tokenizer kind 'sentencepiece'"),
    (["--text-split", "paragraph"], "--text-split must be line, block or file"),
    (["--encoding", "klingon"], "unknown encoding 'klingon'"),
    (["--precision", "fp8"], "--precision must be auto, fp32 or bf16"),
    (["--preset", "huge"], "unknown --preset 'huge'"),
]


# Cases that only the data can decide: refused after reading it, before training a tokenizer.
NEEDS_THE_DATA = {"objective summarize needs document/summary pairs"}


@pytest.mark.parametrize("flags, pattern", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_impossible_or_contradictory_flags(tmp_path, corpus_files, monkeypatch, flags, pattern):
    text, _ = corpus_files
    work = []
    real_load_raw = prepare.load_raw
    monkeypatch.setattr(prepare, "load_raw", lambda cfg: work.append("read") or real_load_raw(cfg))
    monkeypatch.setattr(prepare, "train_tokenizer", lambda *a, **k: work.append("tokenizer"))
    message = main_error(run_flags(tmp_path, "--train-text", str(text)) + flags)
    assert re.search(pattern, message), message
    assert work == (["read"] if pattern in NEEDS_THE_DATA else []), work


def test_tokenizer_and_resume_contradict(tmp_path, tiny_run):
    message = main_error(["--resume", str(tiny_run), "--tokenizer", str(tiny_run)])
    assert "--tokenizer and --resume contradict" in message


def test_a_zero_weight_objective_needs_no_data(tmp_path, corpus_files):
    text, _ = corpus_files
    flags = run_flags(tmp_path, "--train-text", str(text))
    train.main(flags + ["--objectives", "masked_lm=1,gap_summary=0,summarize=0"])
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {k for m in lines for k in m if k.startswith("loss/")} == {"loss/masked_lm"}


def test_unknown_flag_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--max-step", "10", "--no-such-option"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def lm(tiny_run):
    return api.load(tiny_run)


def test_fill_mask_with_many_masks(lm):
    text = " ".join(["[MASK]"] * 40)
    result = lm.fill_mask(text, top_k=3)
    assert len(result) == 40
    special = set(lm.tokenizer.all_special_ids)
    for options in result:
        assert len(options) == 3 and not any(o["token_id"] in special for o in options)
        scores = [o["score"] for o in options]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "text",
    ["[MASK]", "[MASK][MASK]", "  [MASK]  ", "émoji 🎉 [MASK] ünïcode", "nul\x00and\ttabs [MASK]",
     "[mask] lower case stays text, [MASK] is the mask", "[MASK_SENT] [MASK] [SEP] [CLS]"],
)  # fmt: skip
def test_fill_mask_odd_texts(lm, text):
    result = lm.fill_mask(text, top_k=2)
    assert isinstance(result, list) and result
    first = result if isinstance(result[0], dict) else result[0]
    assert len(first) == 2 and all("[MASK]" not in o["sequence"] for o in first)


def test_fill_mask_without_a_mask_or_too_long(lm, learned_run):
    with pytest.raises(ValueError, match="text 1 has no \\[MASK\\] to fill"):
        lm.fill_mask(["a [MASK] b", "no mask here"])
    with pytest.raises(ValueError, match="text 0 is .* tokens long; the model reads at most 128"):
        api.load(learned_run).fill_mask("word " * 300 + "[MASK]")
    with pytest.raises(TypeError):
        lm.fill_mask(["a [MASK]", None])


def test_empty_batches_give_empty_results(lm):
    assert lm.fill_mask([]) == []
    assert lm.summarize([]) == []


def test_summarize_empty_blank_and_very_long_inputs(lm):
    for text in ["", "   \n\t ", "x", "word " * 50_000]:
        out = lm.summarize(text, max_new_tokens=6, num_beams=2)
        assert isinstance(out, str)


def test_summarize_batch_of_mixed_lengths_equals_one_at_a_time(lm, texts):
    docs = [texts[0], texts[1][:30], "", " ".join(texts[2:6]), "short."]
    batch = lm.summarize(docs, max_new_tokens=8, num_beams=1, batch_size=5)
    alone = [lm.summarize(d, max_new_tokens=8, num_beams=1) for d in docs]
    assert batch == alone


def test_summarize_options_that_leave_no_room(learned_run):
    """A learned table of 128 positions holds the source and the summary together."""
    with pytest.raises(ValueError, match="leaves no room for the source"):
        api.load(learned_run).summarize("text", max_new_tokens=127)
