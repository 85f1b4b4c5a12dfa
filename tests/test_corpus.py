"""data.corpus: the embedded corpus is deterministic, cached (once, as tables), leak-free and
well filtered."""

from __future__ import annotations

from pathlib import Path

import pytest

from data import corpus as corpus_module
from data import raw as raw_module
from data.cache import DONE
from data.config import DataConfig
from data.corpus import (
    MIN_BODY_WORDS,
    MIN_TEXT_WORDS,
    SUMMARY_WORDS,
    Corpus,
    build_default_corpus,
    corpus_key,
    docstring_pair,
    file_docstrings,
)
from data.raw import load_raw
from data.split import held_out_document, is_held_out

MAX_CHARS = 1_500_000
EVAL_FRACTION = 0.1  # large, so the small test corpus still holds out enough to check


@pytest.fixture(scope="module")
def built() -> Corpus:
    return build_default_corpus(eval_fraction=EVAL_FRACTION, max_chars=MAX_CHARS)


def all_texts(corpus: Corpus) -> list[str]:
    return corpus.train_texts + corpus.eval_texts


def test_size_and_shape(built: Corpus) -> None:
    texts = all_texts(built)
    assert len(built.train_texts) > 500 and len(built.eval_texts) > 20
    assert len(built.train_pairs) > 100 and len(built.eval_pairs) > 5
    assert MAX_CHARS * 0.9 < sum(map(len, texts)) <= MAX_CHARS
    assert len(set(texts)) == len(texts)
    assert all(t == t.strip() and len(t.split()) >= MIN_TEXT_WORDS for t in texts)
    assert "\n" not in built.describe() and f"{len(built.train_texts):,} train" in (
        built.describe()
    )


def test_rebuild_is_identical(built: Corpus) -> None:
    assert build_default_corpus(EVAL_FRACTION, MAX_CHARS) == built


def _as_lists(raw) -> Corpus:
    return Corpus(
        *(list(getattr(raw, f"{s}_{k}")) for k in ("texts", "pairs") for s in ("train", "eval"))
    )


def test_cache_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The corpus is built once, into the Arrow store; a second load reads the tables."""
    small = Corpus(["a text"], ["held out"], [("document", "summary")], [])
    monkeypatch.setenv("MINITURING_CACHE", str(tmp_path))
    monkeypatch.setattr(raw_module, "build_default_corpus", lambda **k: small)
    assert _as_lists(load_raw(DataConfig(corpus_max_chars=1000))) == small
    monkeypatch.setattr(raw_module, "build_default_corpus", lambda **k: pytest.fail("cache missed"))
    assert _as_lists(load_raw(DataConfig(corpus_max_chars=1000))) == small
    (folder,) = (tmp_path / "prepared").iterdir()  # no temporary files left
    assert folder.name.startswith("corpus-") and (folder / DONE).is_file()


def test_cache_key_covers_the_options() -> None:
    key = corpus_key
    assert key(0.02, 1000) == key(0.02, 1000)
    assert len({key(0.02, 1000), key(0.05, 1000), key(0.02, 2000), key(0.02, None)}) == 4


def test_unreadable_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = Corpus(["a text"], ["held out"], [("document", "summary")], [])
    monkeypatch.setenv("MINITURING_CACHE", str(tmp_path))
    monkeypatch.setattr(raw_module, "build_default_corpus", lambda **k: small)
    load_raw(DataConfig(corpus_max_chars=1000))
    (folder,) = (tmp_path / "prepared").iterdir()
    (folder / DONE).unlink()
    (folder / "eval_texts.arrow").write_bytes(b"not arrow at all")
    assert _as_lists(load_raw(DataConfig(corpus_max_chars=1000))) == small
    assert "held out" in list(load_raw(DataConfig(corpus_max_chars=1000)).eval_texts)


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = Corpus(["a text"], [], [], [])
    monkeypatch.setattr(raw_module, "build_default_corpus", lambda **k: small)
    monkeypatch.setenv("MINITURING_CACHE", str(tmp_path / "env-cache"))
    assert _as_lists(load_raw(DataConfig(corpus_max_chars=1000))) == small
    assert len(list((tmp_path / "env-cache" / "prepared").glob(f"corpus-*/{DONE}"))) == 1


def test_held_out_docstrings_never_reach_training(built: Corpus) -> None:
    assert all(held_out_document(t, EVAL_FRACTION) for t in built.eval_texts)
    assert not any(held_out_document(t, EVAL_FRACTION) for t in built.train_texts)
    held = set(built.eval_texts)
    assert held.isdisjoint(built.train_texts)
    for document, summary in built.train_pairs:
        assert document not in held and summary not in held
    # Every training pair comes from a training docstring, every eval pair from a held-out one.
    train_derived = {docstring_pair(t) for t in built.train_texts}
    eval_derived = {docstring_pair(t) for t in built.eval_texts}
    assert set(built.train_pairs) <= train_derived
    assert set(built.eval_pairs) <= eval_derived
    train_summaries = {s for _, s in built.train_pairs}
    assert not any(s in train_summaries for _, s in built.eval_pairs)


def test_pairs_meet_the_thresholds(built: Corpus) -> None:
    for document, summary in built.train_pairs + built.eval_pairs:
        assert SUMMARY_WORDS[0] <= len(summary.split()) <= SUMMARY_WORDS[1]
        assert "\n" not in summary and not summary.endswith(":") and ">>>" not in summary
        assert len(document.split()) >= MIN_BODY_WORDS
        assert document == document.strip()


def test_capped_subset_samples_every_package() -> None:
    files = sorted(corpus_module._source_files(), key=lambda f: corpus_module._order_key(f[0]))
    groups = {label.split("/")[0] for label, _ in files}
    first = {label.split("/")[0] for label, _ in files[: len(files) // 20]}
    assert "stdlib" in groups
    assert len(first) >= min(len(groups), 3)


def test_docstring_pair() -> None:
    body = " ".join(["The longer description explains what the function does."] * 6)
    pair = docstring_pair(f"Compute the mean of the values\nalong an axis.\n\n{body}")
    assert pair == (body, "Compute the mean of the values along an axis.")
    assert docstring_pair(f"Short summary.\n\n{body}") is None
    assert docstring_pair(f"Args:\n    x: the values to average over the axis.\n\n{body}") is None
    assert docstring_pair("Compute the mean of the values along an axis.\n\nToo short.") is None
    doctest = "\n".join([">>> mean([1, 2, 3])", "2.0"] * 30)
    summary = "Compute the mean of the values along an axis."
    assert docstring_pair(f"{summary}\n\n{body}\n\n{doctest}") is None
    literal = "Use it like this::\n\n" + "\n".join(["    total = mean(values)"] * 20)
    assert docstring_pair(f"{summary}\n\n{body}\n\n{literal}") is None
    assert docstring_pair(f"{summary} {body}") is None  # no summary paragraph


def test_file_docstrings(tmp_path: Path) -> None:
    words = " ".join(f"word{i}" for i in range(MIN_TEXT_WORDS))
    source = tmp_path / "module.py"
    source.write_text(
        f'"""Module {words}."""\n'
        "import sys\n"
        "if sys.version_info >= (3,):\n"
        "    class A:\n"
        f'        """Class {words}."""\n'
        "        def f(self):\n"
        f"            '''Method {words}.'''\n"
        "            def inner():\n"
        f'                """Inner {words}."""\n'
        "def short():\n"
        '    """Too short to keep."""\n',
        encoding="utf-8",
    )
    found = file_docstrings(str(source))
    assert [d.split()[0] for d in found] == ["Module", "Class", "Method", "Inner"]
    broken = tmp_path / "broken.py"
    broken.write_text(f'"""{words}"""\ndef (:\n', encoding="utf-8")
    assert file_docstrings(str(broken)) == []
    assert file_docstrings(str(tmp_path / "missing.py")) == []


def test_is_held_out_is_stable_and_proportional() -> None:
    keys = [f"document {i}" for i in range(20_000)]
    share = sum(is_held_out(k, 0.05) for k in keys) / len(keys)
    assert 0.04 < share < 0.06
    assert not any(is_held_out(k, 0.0) for k in keys[:100])
    # Fixed values: the split must not change between versions or machines.
    assert [is_held_out(f"key {i}", 0.5) for i in range(8)] == EXPECTED_HALF_SPLIT


EXPECTED_HALF_SPLIT = [True, False, False, True, True, True, True, False]


def test_the_embedded_corpus_is_built_in_a_child_whose_errors_reach_the_caller(
    tmp_path, monkeypatch
):
    """The build runs in a child process (so its peak memory ends with it); what it raises is
    raised to the trainer, and no table is left as if complete."""
    import os

    monkeypatch.setenv("MINITURING_CACHE", str(tmp_path))
    parent = os.getpid()

    def broken(**kwargs):
        raise ValueError(f"built in {'the parent' if os.getpid() == parent else 'a child'}")

    monkeypatch.setattr(raw_module, "build_default_corpus", broken)
    with pytest.raises(ValueError, match="built in a child"):
        load_raw(DataConfig(corpus_max_chars=12345))
    assert not list((tmp_path / "prepared").glob(f"corpus-*/{DONE}"))
