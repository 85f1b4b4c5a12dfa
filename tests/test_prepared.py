"""data.store / data.pipeline: prepared data lives on disk, memory-mapped, cached by what
identifies the input, written atomically; near-duplicates stay on one side of the split."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from data import pipeline
from data import raw as raw_module
from data.batching import MixtureLoader
from data.cache import DONE
from data.config import DataConfig
from data.pipeline import build_streams
from data.raw import RawData, load_raw
from data.split import group_key, held_out_document
from data.store import FileArray, Ragged, TextTable, write_array
from data.vocab import train_tokenizer, training_sample

SENTENCES = [
    "The reader opens the file and returns one record per line.",
    "Each value is checked against the schema before it is stored.",
    "A missing column raises an error that names the file.",
    "Results are written to disk when the batch is full.",
    "The cache is keyed by the size and time of every input.",
]


def _write_corpus(folder: Path, docs: int = 400) -> tuple[Path, Path]:
    text = folder / "text.txt"
    text.write_text(
        "".join(
            " ".join(SENTENCES[(i + j) % 5] for j in range(1 + i % 4)) + f" Item {i}.\n"
            for i in range(docs)
        )
    )
    pairs = folder / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(
                {"document": " ".join(SENTENCES[i % 5 :]) + f" Case {i}.", "summary": f"c{i}"}
            )
            + "\n"
            for i in range(docs // 2)
        )
    )
    return text, pairs


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MINITURING_CACHE", str(root))
    return root


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    return _write_corpus(tmp_path)


def _cfg(files, **kw) -> DataConfig:
    return DataConfig(train_text=[str(files[0])], train_pairs=[str(files[1])], **kw)


def _streams(raw, cfg):
    tok = train_tokenizer(raw.train_texts + [d for d, _ in raw.train_pairs], vocab_size=400)
    return tok, build_streams(raw, tok, cfg, ["masked_lm", "gap_summary", "summarize"], 32)


def _batches(streams, n=30) -> list:
    loader = MixtureLoader(streams.train, {"masked_lm": 1, "gap_summary": 1, "summarize": 1}, 4, 7)
    out = []
    for _ in range(n):
        name, batch = loader.next_batch()
        out.append((name, {k: v.numpy().copy() for k, v in batch.items()}))
    return out


def _same(a, b) -> bool:
    return all(
        na == nb and all(np.array_equal(ba[k], bb[k]) for k in ba)
        for (na, ba), (nb, bb) in zip(a, b, strict=True)
    )


def test_prepared_data_stays_on_disk(cache, files):
    cfg = _cfg(files)
    raw = load_raw(cfg)
    assert isinstance(raw.train_texts, TextTable) and raw.has("summarize")
    assert len(raw.train_texts) + len(raw.val_texts) + len(raw.eval_texts) == 400
    assert raw.eval_pairs[0] == list(raw.eval_pairs)[0]
    _, streams = _streams(raw, cfg)
    assert isinstance(streams.train["masked_lm"].flat, FileArray)
    for name in ("gap_summary", "summarize"):
        stream = streams.train[name]
        assert isinstance(stream.sources, Ragged) and isinstance(stream.sources.flat, FileArray)
        assert isinstance(stream.targets.offsets, FileArray)
        # Padded streams order an epoch by their lengths; packed ones at random.
        lengths = stream.lengths()
        assert (lengths is None) if stream.pack else len(lengths) == len(stream)


def test_file_array_reads_what_the_file_holds(tmp_path):
    values = np.arange(-5, 1000, dtype=np.int32) * 7
    write_array(tmp_path / "a.int32", values)
    a = FileArray(tmp_path / "a.int32", np.int32)
    assert len(a) == len(values) and a.shape == values.shape
    for key in (slice(0, 10), slice(500, 508), slice(990, 2000), slice(7, 3), slice(None)):
        assert np.array_equal(a[key], values[key])
    assert np.array_equal(a[1:100:3], values[1:100:3])
    assert a[0] == values[0] and a[-1] == values[-1] and a[500] == values[500]
    with pytest.raises(IndexError, match="out of range"):
        a[len(values)]
    assert np.array_equal(np.diff(np.asarray(a)), np.diff(values))
    again = pickle.loads(pickle.dumps(a))  # as a worker process receives it
    assert np.array_equal(again[3:9], values[3:9])


def test_warm_cache_reads_no_source_and_gives_the_same_batches(cache, files, monkeypatch):
    cfg = _cfg(files)
    raw = load_raw(cfg)
    tok, streams = _streams(raw, cfg)
    first = _batches(streams)

    def no_reading(*a, **k):
        raise AssertionError("a warm cache must not read the source again")

    monkeypatch.setattr(raw_module, "iter_texts", no_reading)
    monkeypatch.setattr(raw_module, "iter_pairs", no_reading)
    monkeypatch.setattr(pipeline, "gap_sentences", no_reading)
    raw2 = load_raw(cfg)
    streams2 = build_streams(raw2, tok, cfg, ["masked_lm", "gap_summary", "summarize"], 32)
    assert _same(first, _batches(streams2))


def test_changed_file_is_read_again(cache, files):
    cfg = _cfg(files)
    before = len(load_raw(cfg).train_texts) + len(load_raw(cfg).eval_texts)
    with open(files[0], "a") as f:
        f.write("One more document that was appended later.\n")
    raw = load_raw(cfg)
    assert len(raw.train_texts) + len(raw.eval_texts) == before + 1


def test_list_inputs_match_tables(cache, files):
    """Plain lists (model/cli.py's evaluate) give the same streams as the cached tables."""
    cfg = _cfg(files)
    raw = load_raw(cfg)
    tok, streams = _streams(raw, cfg)
    as_lists = RawData(list(raw.train_texts), [], list(raw.train_pairs), [], "lists")
    streams2 = build_streams(as_lists, tok, cfg, ["masked_lm", "gap_summary", "summarize"], 32)
    assert _same(_batches(streams), _batches(streams2))


def test_incomplete_cache_and_leftover_tmp_are_rebuilt(cache, files):
    cfg = _cfg(files)
    raw = load_raw(cfg)
    expected = list(raw.train_texts)
    prepared = cache / "prepared"
    (folder,) = [p for p in prepared.iterdir() if p.name.startswith("texts-")]
    # A folder without its completion marker, with garbage in it, is removed and rebuilt.
    (folder / DONE).unlink()
    (folder / "train.arrow").write_bytes(b"half written")
    # A temporary folder of a process that no longer exists is removed.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    stale = prepared / f"{folder.name}.tmp-{int(dead.stdout)}-deadbeef"
    stale.mkdir()
    (stale / "train.arrow").write_bytes(b"junk")
    raw = load_raw(cfg)
    assert list(raw.train_texts) == expected
    assert (folder / DONE).is_file() and not stale.exists()


def test_kill_during_preparation_leaves_nothing_that_is_reused(cache, files):
    """A process killed (os._exit, as by kill -9) while writing leaves only a temporary folder;
    the next run builds the cache from scratch."""
    script = textwrap.dedent(
        f"""
        import os
        from data import store
        from data.config import DataConfig
        from data.raw import load_raw
        store.TableWriter.close = lambda self: os._exit(9)
        load_raw(DataConfig(train_text=[{str(files[0])!r}], train_pairs=[{str(files[1])!r}]))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert done.returncode == 9, done.stderr.decode()
    prepared = cache / "prepared"
    assert [p for p in prepared.iterdir() if ".tmp-" in p.name]
    assert not list(prepared.glob(f"*/{DONE}"))
    raw = load_raw(_cfg(files))
    assert len(raw.train_texts) + len(raw.val_texts) + len(raw.eval_texts) == 400
    assert not [p for p in prepared.iterdir() if ".tmp-" in p.name]


def test_interrupted_tokenization_resumes_from_its_shards(cache, files, monkeypatch):
    cfg = _cfg(files)
    raw = load_raw(cfg)
    monkeypatch.setattr(pipeline, "SHARD_BATCHES", 1)
    monkeypatch.setattr("data.store.BATCH_ROWS", 50)
    texts = list(raw.train_texts)
    tok = train_tokenizer(texts, vocab_size=400)
    tok_key = "k"
    calls = []
    real = pipeline.encode_texts

    def failing(tokenizer, batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(tokenizer, batch)

    monkeypatch.setattr(pipeline, "encode_texts", failing)
    with pytest.raises(KeyboardInterrupt):
        pipeline.tokenize_texts(texts, tok, "t", tok_key)
    monkeypatch.setattr(pipeline, "encode_texts", lambda t, b: calls.append(len(b)) or real(t, b))
    calls.clear()
    flat = pipeline.tokenize_texts(texts, tok, "t", tok_key)
    shards = -(-len(texts) // 50)
    assert len(calls) == shards - 2  # the two finished shards were not tokenized again
    sep = tok.sep_token_id
    whole = [i for x in tok(texts, add_special_tokens=False)["input_ids"] for i in x + [sep]]
    assert np.asarray(flat).tolist() == whole


def test_parallel_gap_extraction_matches_serial(cache, files, monkeypatch):
    monkeypatch.setattr(pipeline, "SHARD_BATCHES", 1)
    monkeypatch.setattr("data.store.BATCH_ROWS", 64)
    cfg = _cfg(files)
    raw = load_raw(cfg)
    assert raw.train_texts.num_batches > 2
    tok = train_tokenizer(raw.train_texts, vocab_size=400)
    serial = pipeline.gap_pairs(list(raw.train_texts), cfg, tok, "serial", "k")
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_DOCS", 1)
    monkeypatch.setattr(pipeline, "worker_count", lambda: 2)
    pools = []
    real_context = pipeline.mp_context
    monkeypatch.setattr(pipeline, "mp_context", lambda: pools.append(1) or real_context())
    parallel = pipeline.gap_pairs(raw.train_texts, cfg, tok, "parallel", "k")
    assert pools
    for a, b in zip(serial, parallel, strict=True):
        assert np.array_equal(a.flat, b.flat) and np.array_equal(a.offsets, b.offsets)
    assert len(serial[0]) > 100


def test_skip_warnings_repeat_on_a_cache_hit(cache, tmp_path, caplog):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("first document here\nsecond document here\n")
    (folder / "empty.txt").write_text("")
    cfg = DataConfig(train_text=[str(folder)])
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.sources"):
            load_raw(cfg)
        assert any("1 empty file" in r.getMessage() for r in caplog.records)


def test_near_duplicates_share_a_group_key():
    a = "Read a CSV file into a DataFrame.  Supports chunking, and iteration over lines."
    b = "read a csv file into a dataframe: supports chunking and iteration over lines!!"
    assert group_key(a) == group_key(b)
    tail = "A helper that parses the options of the command line, checks every value against the schema and returns them "
    assert group_key(tail + "(copy one).") == group_key(tail + "(in the other module)")
    assert group_key("alpha beta") != group_key("alpha gamma")


def test_near_duplicates_land_on_the_same_side(cache, tmp_path):
    docs = []
    for i in range(300):
        base = f"Package {i} provides tools for parsing, validating and writing configuration files of many formats"
        docs += [base + ".", base.upper() + "!", "  " + base.replace(" ", "   ") + " -- fork"]
    for i in range(0, len(docs), 3):
        sides = {held_out_document(d, 0.3) for d in docs[i : i + 3]}
        assert len(sides) == 1
    path = tmp_path / "dups.txt"
    path.write_text("\n".join(docs) + "\n")
    raw = load_raw(DataConfig(train_text=[str(path)], eval_fraction=0.3))
    held = {group_key(d) for d in raw.eval_texts}
    assert held and not held & {group_key(d) for d in raw.train_texts}


def test_tokenizer_sample_is_every_kth_document():
    texts = [f"doc {i}" for i in range(10)]
    assert list(training_sample(texts, 100, 1000)) == texts
    assert list(training_sample(texts, 100, 25)) == texts[::4]


def test_tokenizer_trains_on_a_bounded_sample_of_a_large_corpus(cache, tmp_path, monkeypatch):
    """The tokenizer trainer's memory follows the distinct words it reads, so a corpus larger than
    the sample cap (here one whose every line ends in a distinct number) is read only up to it."""
    from data import vocab

    path = tmp_path / "numbered.txt"
    path.write_text("".join(f"{SENTENCES[i % 5]} {1000 + i}\n" for i in range(2000)))
    texts = load_raw(DataConfig(train_text=[str(path)])).train_texts
    assert texts.num_chars > 100_000
    read = []

    def spy(docs, total, max_chars):
        for doc in training_sample(docs, total, max_chars):
            read.append(doc)
            yield doc

    monkeypatch.setattr(vocab, "training_sample", spy)
    tok = train_tokenizer(texts, vocab_size=300, max_chars=10_000)
    assert 9_000 <= sum(map(len, read)) <= 10_000 + max(map(len, read))
    assert len(tok) >= 300
