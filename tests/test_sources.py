"""data.sources: every source type round-trips, and every kind of bad input gives a DataError
naming the file, the record and what was expected."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from data import sources
from data.sources import DataError, Reading, read_source_pairs, read_source_texts

DOCS = ["The first document.", "A second one, with a comma.", "Third: ünïcödé ✓"]
PAIRS = [("A long document about cats.", "Cats."), ("Another text about dogs.", "Dogs.")]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------- round trips


def test_plain_text_split_modes(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("  alpha beta  \ngamma\n\n\n delta\nepsilon \n   \nzeta", encoding="utf-8")
    assert read_source_texts(str(path)) == ["alpha beta", "gamma", "delta", "epsilon", "zeta"]
    assert read_source_texts(str(path), split="block") == [
        "alpha beta  \ngamma",
        "delta\nepsilon",
        "zeta",
    ]
    assert read_source_texts(str(path), split="file") == [
        "alpha beta  \ngamma\n\n\n delta\nepsilon \n   \nzeta"
    ]


def test_plain_text_any_extension_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "corpus.log"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n")
    assert read_source_texts(str(path)) == ["one", "two"]


def test_other_encoding(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("café\nnaïve\n".encode("latin-1"))
    assert read_source_texts(str(path), reading=Reading(encoding="latin-1")) == ["café", "naïve"]
    wide = tmp_path / "wide.txt"
    wide.write_text("one\ntwo\n", encoding="utf-16")
    assert read_source_texts(str(wide), reading=Reading(encoding="utf-16")) == ["one", "two"]


def test_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    assert read_source_texts(str(path)) == DOCS


def test_json_list_and_json_lines(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"body": d} for d in DOCS], indent=2), encoding="utf-8")
    assert read_source_texts(str(listed), text_column="body") == DOCS
    lines = write_jsonl(tmp_path / "lines.json", [{"body": d} for d in DOCS])
    assert read_source_texts(str(lines), text_column="body") == DOCS


def test_csv_and_tsv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["id", "text"], [[str(i), d] for i, d in enumerate(DOCS)])
    assert read_source_texts(str(path)) == DOCS
    multiline = write_csv(tmp_path / "m.csv", ["text"], [["line one\nline two"], ["x, y"]])
    assert read_source_texts(str(multiline)) == ["line one\nline two", "x, y"]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tother\nhello there\t1\n", encoding="utf-8")
    assert read_source_texts(str(tsv)) == ["hello there"]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), path)
    assert read_source_texts(str(path)) == DOCS
    pairs = tmp_path / "p.parquet"
    pq.write_table(
        pa.table({"article": [d for d, _ in PAIRS], "highlights": [s for _, s in PAIRS]}), pairs
    )
    assert (
        read_source_pairs(str(pairs), document_column="article", summary_column="highlights")
        == PAIRS
    )


def test_pairs_from_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"document": d, "summary": s} for d, s in PAIRS])
    assert read_source_pairs(str(jsonl)) == PAIRS
    csv_path = write_csv(tmp_path / "p.csv", ["summary", "document"], [[s, d] for d, s in PAIRS])
    assert read_source_pairs(str(csv_path)) == PAIRS


def test_saved_dataset_and_dataset_dict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": DOCS, "document": DOCS, "summary": DOCS})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_source_texts(str(tmp_path / "ds")) == DOCS
    assert read_source_pairs(str(tmp_path / "ds")) == [(d, d) for d in DOCS]
    other = datasets.Dataset.from_dict({"text": ["held out text"]})
    datasets.DatasetDict({"train": ds, "validation": other}).save_to_disk(str(tmp_path / "dd"))
    assert read_source_texts(str(tmp_path / "dd")) == DOCS
    assert read_source_texts(str(tmp_path / "dd"), reading=Reading(hf_split="validation")) == [
        "held out text"
    ]
    with pytest.raises(DataError, match=r"dd: .*no split 'test' \(splits: train, validation\)"):
        read_source_texts(str(tmp_path / "dd"), reading=Reading(hf_split="test"))


def test_datasets_imported_only_for_saved_or_hub_data(tmp_path: Path) -> None:
    """The trainer's modules leave ``datasets`` unimported (about 55 MiB of resident
    memory); reading a saved dataset imports it with its progress bars off."""
    pytest.importorskip("datasets")
    script = (
        "import sys, train, trainer.loop, trainer.evaluate\n"
        "print('datasets' in sys.modules)\n"
        "from data.sources import read_source_texts\n"
        "import datasets\n"
        "datasets.Dataset.from_dict({'text': ['a saved text']}).save_to_disk(sys.argv[1])\n"
        "from datasets.utils.logging import enable_progress_bar, is_progress_bar_enabled\n"
        "enable_progress_bar()\n"
        "print(read_source_texts(sys.argv[1]), is_progress_bar_enabled())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "ds")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    assert out.stdout.split("\n")[:2] == ["False", "['a saved text'] False"]


def test_folder_recursive_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("from a\n", encoding="utf-8")
    (tmp_path / "b" / "c.md").write_text("from c\n", encoding="utf-8")
    write_jsonl(tmp_path / "b" / "d.jsonl", [{"text": "from d"}])
    write_csv(tmp_path / "e.csv", ["text"], [["from e"]])
    (tmp_path / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["from saved"]}).save_to_disk(str(tmp_path / "f"))
    # Files of a folder come before its subfolders' (os.walk order), each level sorted.
    assert read_source_texts(str(tmp_path)) == [
        "from a",
        "from e",
        "from c",
        "from d",
        "from saved",
    ]


def test_folder_of_pairs_skips_plain_text(tmp_path: Path, caplog) -> None:
    write_jsonl(tmp_path / "p.jsonl", [{"document": d, "summary": s} for d, s in PAIRS])
    (tmp_path / "README.md").write_text("about this folder\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        assert read_source_pairs(str(tmp_path)) == PAIRS
    assert "1 plain text file" in caplog.text and "README.md" in caplog.text


def test_hub_name_goes_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["from the hub"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert read_source_texts("owner/name", reading=Reading("cfg", "test")) == ["from the hub"]
    assert calls == [("owner/name", "cfg", "test")]


def test_hub_name_is_streamed_with_streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    """--streaming reads a hub dataset as an IterableDataset, with the same field checks."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def rows():
        yield from ({"text": t} for t in ("one", " ", "two", None))

    def fake_load(name, config, split, streaming=False):
        calls.append((name, config, split, streaming))
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert read_source_texts("owner/name", reading=Reading(hf_split="test"), streaming=True) == [
        "one",
        "two",
    ]
    assert calls == [("owner/name", None, "test", True)]


# ---------------------------------------------------------------------------- bad input


def test_missing_path_does_not_reach_the_hub(tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub called"))
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or folder"):
        read_source_texts(str(tmp_path / "missing.jsonl"))


def test_unloadable_hub_name(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        read_source_texts("someone/no-such-dataset")
    message = str(info.value)
    assert "someone/no-such-dataset: no such file or folder" in message
    assert "could not be loaded as a Hugging Face Hub dataset" in message
    assert "Couldn't reach the Hub" in message and "long details" not in message


def test_empty_files_are_skipped_with_one_warning(tmp_path: Path, caplog) -> None:
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.txt").write_text("  \n\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("content\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        assert read_source_texts(str(tmp_path)) == ["content"]
    assert len(caplog.records) == 1
    assert "3 empty files" in caplog.text and "a.txt" in caplog.text


def test_nothing_left_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n   \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no documents found in .*blank\.txt .*1 empty file"):
        read_source_texts(str(path))
    records = write_jsonl(tmp_path / "r.jsonl", [{"text": " "}, {"text": None}])
    with pytest.raises(DataError, match=r"no documents found in .*r\.jsonl .*2 empty documents"):
        read_source_texts(str(records))


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=r"folder holds no data files"):
        read_source_texts(str(tmp_path))


def test_empty_documents_and_summaries_are_counted(tmp_path: Path, caplog) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"document": "  kept  ", "summary": " yes "},
            {"document": "", "summary": "s"},
            {"document": None, "summary": "s"},
            {"document": "d", "summary": "\n\t"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        assert read_source_pairs(str(path)) == [("kept", "yes")]
    assert len(caplog.records) == 1
    assert "2 empty documents" in caplog.text and "1 empty summary" in caplog.text
    assert "p.jsonl" in caplog.text


def test_non_utf8_names_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"fine\nalso fine\ncaf\xe9 au lait\n")
    with pytest.raises(DataError) as info:
        read_source_texts(str(path))
    message = str(info.value)
    assert "latin.txt, line 3 (byte offset 18)" in message
    assert "encoding" in message and "utf-8" in message


def test_non_utf8_in_structured_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl, line 2 \(byte offset 28\)"):
        read_source_texts(str(jsonl))
    csv_path = tmp_path / "x.csv"
    csv_path.write_bytes(b"text\nok\n\xff\n")
    with pytest.raises(DataError, match=r"x\.csv, line 3 \(byte offset 8\)"):
        read_source_texts(str(csv_path))


def test_decode_error_deep_in_a_long_file(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    line = b"x" * 99 + b"\n"
    path.write_bytes(line * 30_000 + b"\xc3(\n")
    with pytest.raises(DataError, match=r"line 30001 \(byte offset 3000000\)"):
        read_source_texts(str(path))


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"model\.bin: looks like a binary file"):
        read_source_texts(str(path))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("hello\n", encoding="utf-16")
    with pytest.raises(DataError, match=r"utf16\.txt: .*UTF-16 byte-order mark.*'utf-16'"):
        read_source_texts(str(utf16))


def test_long_documents_are_cut_at_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    words = " ".join(f"w{i}" for i in range(2000))
    path.write_text(words + "\nshort\n", encoding="utf-8")
    docs = read_source_texts(str(path), max_chars=1000)
    assert all(len(d) <= 1000 for d in docs)
    assert " ".join(docs[:-1]) == words and docs[-1] == "short"
    assert all(not d.startswith(" ") and not d.endswith(" ") for d in docs)
    records = write_jsonl(tmp_path / "long.jsonl", [{"text": words}])
    assert " ".join(read_source_texts(str(records), max_chars=1000)) == words


@pytest.mark.slow
def test_hundred_megabyte_line(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    word = b"lorem ipsum dolor sit amet "
    with open(path, "wb") as f:
        f.write(word * (100_000_000 // len(word)))
    start = time.perf_counter()
    docs = read_source_texts(str(path), max_chars=1_000_000)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert 99 <= len(docs) <= 101
    assert all(0 < len(d) <= 1_000_000 for d in docs)
    assert all(d.startswith("lorem") and d.endswith("amet") for d in docs)
    assert sum(len(d) + 1 for d in docs) == path.stat().st_size
    path.unlink()  # pytest keeps recent tmp folders; do not leave 100 MB behind


def test_missing_column(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}, {"txt": "y", "id": 2}])
    with pytest.raises(DataError) as info:
        read_source_texts(str(jsonl))
    message = str(info.value)
    assert "d.jsonl, line 2: no column 'text'" in message
    assert "'txt', 'id'" in message and "--text-column" in message

    csv_path = write_csv(tmp_path / "d.csv", ["article", "highlights"], [["a", "b"]])
    with pytest.raises(DataError) as info:
        read_source_pairs(str(csv_path))
    message = str(info.value)
    assert "d.csv, header (line 1): no column 'document'" in message
    assert "'article', 'highlights'" in message and "--document-column" in message

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"document": ["d"], "abstract": ["s"]}), parquet)
    with pytest.raises(DataError, match=r"d\.parquet, schema: no column 'summary'.*--summary-col"):
        read_source_pairs(str(parquet))


def test_missing_column_in_saved_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": ["x"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds, features: no column 'text' .*'content'"):
        read_source_texts(str(tmp_path / "ds"))


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "unterminated}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        read_source_texts(str(path))


def test_invalid_json_list(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "ok"},\n  {"text": oops}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json, line 3: not valid JSON"):
        read_source_texts(str(path))


def test_record_not_an_object(tmp_path: Path) -> None:
    jsonl = tmp_path / "strings.jsonl"
    jsonl.write_text('{"text": "ok"}\n"just a string"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"strings\.jsonl, line 2: expected a JSON object.*str"):
        read_source_texts(str(jsonl))
    listed = tmp_path / "list.json"
    listed.write_text('[{"text": "ok"}, ["a", "list"]]', encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.json, record index 1: expected a JSON object"):
        read_source_texts(str(listed))


@pytest.mark.parametrize(
    ("value", "type_name"), [(42, "int"), (1.5, "float"), (["a"], "list"), ({"a": 1}, "dict")]
)
def test_wrong_type_in_column(tmp_path: Path, value: object, type_name: str) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "fine"}, {"text": value}])
    with pytest.raises(DataError) as info:
        read_source_texts(str(path))
    message = str(info.value)
    assert f"mixed.jsonl, line 2: column 'text' holds a {type_name}" in message
    assert "expected text" in message


def test_wrong_type_in_parquet_column(tmp_path: Path) -> None:
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"document": ["d1", "d2"], "summary": ["s", None], "x": [1, 2]}), path)
    assert read_source_pairs(str(path)) == [("d1", "s")]
    with pytest.raises(DataError, match=r"n\.parquet, row index 0: column 'x' holds a int"):
        read_source_pairs(str(path), summary_column="x")


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("text,label\nfine,1\nnot fine\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ragged\.csv, line 3: 1 fields, but the header has 2"):
        read_source_texts(str(path))


def test_plain_text_file_cannot_give_pairs(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("text\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes\.txt: a plain text file holds no .*pairs"):
        read_source_pairs(str(path))


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable parquet file"):
        read_source_texts(str(path))


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        read_source_texts("x.txt", split="paragraph")
    with pytest.raises(ValueError, match="unknown encoding"):
        read_source_texts(__file__, reading=Reading(encoding="no-such-codec"))


def test_data_error_is_a_value_error() -> None:
    assert issubclass(sources.DataError, ValueError)


def test_unreadable_file_in_folder(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("fine\n", encoding="utf-8")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(DataError, match=r"gone\.txt: cannot read"):
        read_source_texts(str(tmp_path))


def test_json_nested_too_deeply(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "ok"}\n' + "[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"deep\.jsonl, line 2: "):
        read_source_texts(str(path))
