"""Read user data: documents for the self-supervised objectives, (document, summary) pairs for
supervised summarization.

A source is one of:

- a plain text file (any extension other than the structured ones below);
- a ``.jsonl`` file (one JSON object per line), a ``.json`` file (JSON lines, or one list of
  objects), a ``.csv`` / ``.tsv`` file with a header row, or a ``.parquet`` file;
- a folder written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
- any other folder: searched recursively in sorted path order; ``.txt`` / ``.md`` files are
  read as plain text, the structured files above as records, saved datasets as datasets;
- otherwise, the name of a Hugging Face Hub dataset.

Bad input raises :class:`DataError`, whose message names the source, the record and what was
expected. Empty documents are skipped and reported in one warning per call.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import reprlib
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from data.reading import (
    EMPTY_DOCUMENT,
    EMPTY_FILE,
    EMPTY_SUMMARY,
    TEXT_FILE_FOR_PAIRS,
    UNSUPPORTED_FILE,
    DataError,
    Skipped,
    check_encoding,
    check_not_binary,
    chunks,
    decoding,
    finish,
    first_char,
    os_errors,
    plain_documents,
    read_lines,
    reading_codec,
)

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SPLIT_MODES = ("line", "block", "file")

_BATCH_ROWS = 1024
# Hub ids look like "name" or "owner/name"; anything else that does not exist is a bad path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40

# (document, summary) pairs cannot come from plain text; a message says so in several places.
_PAIR_FORMATS = "a .jsonl, .json, .csv, .tsv or .parquet file or a dataset"

Record = tuple[str, Mapping[str, Any]]
"""Where the record is ("line 7", "row index 3") and its fields."""


# ---------------------------------------------------------------------------- public API


def iter_texts(
    source: str,
    *,
    text_column: str = "text",
    split: str = "line",
    hf_config: str | None = None,
    hf_split: str = "train",
    encoding: str = "utf-8",
    max_chars: int = 1_000_000,
    streaming: bool = False,
) -> Iterator[str]:
    """Documents for the self-supervised objectives, one at a time (none is kept).

    Plain text files are split into documents by ``split``: ``"line"`` (one document per
    non-empty line), ``"block"`` (documents separated by blank lines) or ``"file"`` (the whole
    file). Records give one document each, from ``text_column``.

    Each document is stripped of leading and trailing whitespace. A document longer than
    ``max_chars`` characters is cut into chunks of at most ``max_chars`` characters, at the
    last whitespace of each chunk's second half where there is one, so no downstream step
    sees a giant string. Empty documents (and nulls) are skipped and counted in one warning.
    ``streaming`` reads a hub dataset as it downloads (``load_dataset(..., streaming=True)``)
    instead of preparing it on disk first; files and folders are read one record at a time
    either way.

    Raises:
        DataError: the source is missing, unreadable or malformed, or holds no documents.
    """
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_MODES)}, not {split!r}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, not {max_chars}")
    skipped = Skipped()
    columns = {text_column: "--text-column"}
    count = 0
    with os_errors(source):
        reading = (hf_config, hf_split, encoding, columns, skipped)
        for unit in _units(source, *reading, pairs=False, streaming=streaming):
            if isinstance(unit, Path):
                for doc in plain_documents(unit, split, encoding, max_chars, skipped):
                    count += 1
                    yield doc
                continue
            name, records = unit
            for where, record in records:
                text = _text_field(record, name, where, text_column, "--text-column")
                if text is None:
                    skipped.add(EMPTY_DOCUMENT, name)
                else:
                    for doc in chunks(text, max_chars):
                        count += 1
                        yield doc
    finish(count, source, skipped, "documents")


def read_texts(source: str, **kwargs) -> list[str]:
    """:func:`iter_texts` as a list (same arguments, same errors)."""
    return list(iter_texts(source, **kwargs))


def iter_pairs(
    source: str,
    *,
    document_column: str = "document",
    summary_column: str = "summary",
    hf_config: str | None = None,
    hf_split: str = "train",
    encoding: str = "utf-8",
) -> Iterator[tuple[str, str]]:
    """(document, summary) pairs for supervised summarization, one at a time.

    Pairs come from records (jsonl, json, csv, tsv, parquet, datasets); plain text files in a
    folder are skipped and counted. Both fields are stripped of leading and trailing
    whitespace; pairs where either is empty (or null) are skipped and counted in one warning.
    Documents are not cut: cutting would separate a document from its summary.

    Raises:
        DataError: the source is missing, unreadable or malformed, or holds no pairs.
    """
    skipped = Skipped()
    columns = {document_column: "--document-column", summary_column: "--summary-column"}
    count = 0
    with os_errors(source):
        for unit in _units(source, hf_config, hf_split, encoding, columns, skipped, pairs=True):
            assert not isinstance(unit, Path)  # _units yields no plain text when pairs=True
            name, records = unit
            for where, record in records:
                document = _text_field(record, name, where, document_column, "--document-column")
                summary = _text_field(record, name, where, summary_column, "--summary-column")
                if document is None:
                    skipped.add(EMPTY_DOCUMENT, name)
                elif summary is None:
                    skipped.add(EMPTY_SUMMARY, name)
                else:
                    count += 1
                    yield document, summary
    finish(count, source, skipped, "(document, summary) pairs")


def read_pairs(source: str, **kwargs) -> list[tuple[str, str]]:
    """:func:`iter_pairs` as a list (same arguments, same errors)."""
    return list(iter_pairs(source, **kwargs))


# ---------------------------------------------------------------------------- source resolution

# A unit is a plain text file to read, or a (name, records) pair.
_Unit = Path | tuple[str, Iterator[Record]]


def _units(
    source: str,
    hf_config: str | None,
    hf_split: str,
    encoding: str,
    columns: Mapping[str, str],
    skipped: Skipped,
    *,
    pairs: bool,
    streaming: bool = False,
) -> Iterator[_Unit]:
    check_encoding(encoding)
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            yield source, _dataset_records(_load_saved(path, source, hf_split), source, columns)
        else:
            yield from _folder_units(
                path, source, hf_split, encoding, columns, skipped, pairs=pairs
            )
    elif path.is_file():
        if path.suffix.lower() in RECORD_SUFFIXES:
            yield _file_records(path, source, encoding, columns, skipped)
        elif pairs:
            raise DataError(
                f"{source}: a plain text file holds no (document, summary) pairs; "
                f"expected {_PAIR_FORMATS} with columns {_quoted(columns)}"
            )
        else:
            yield path
    elif path.exists():
        raise DataError(f"{source}: not a regular file or folder")
    else:
        loaded = _load_hub(source, hf_config, hf_split, streaming=streaming)
        yield source, _dataset_records(loaded, source, columns)


def _folder_units(
    folder: Path,
    source: str,
    hf_split: str,
    encoding: str,
    columns: Mapping[str, str],
    skipped: Skipped,
    *,
    pairs: bool,
) -> Iterator[_Unit]:
    found = False
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        # Sorted walks give the same documents in the same order on every machine.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if here != folder and _is_saved_dataset(here):
            dirnames[:] = []
            found = True
            name = str(here)
            yield name, _dataset_records(_load_saved(here, name, hf_split), name, columns)
            continue
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = here / filename
            suffix = path.suffix.lower()
            if suffix in RECORD_SUFFIXES:
                found = True
                yield _file_records(path, str(path), encoding, columns, skipped)
            elif suffix in TEXT_SUFFIXES:
                found = True
                if pairs:
                    skipped.add(TEXT_FILE_FOR_PAIRS, str(path))
                else:
                    yield path
            else:
                skipped.add(UNSUPPORTED_FILE, str(path))
    if not found:
        kinds = ", ".join((*TEXT_SUFFIXES, *RECORD_SUFFIXES))
        raise DataError(f"{source}: folder holds no data files (looked for {kinds}, recursively)")


def _is_saved_dataset(folder: Path) -> bool:
    if (folder / "dataset_dict.json").is_file():  # a DatasetDict
        return True
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def _load_saved(folder: Path, name: str, split: str) -> Any:
    """A folder written by ``save_to_disk``; for a DatasetDict, its ``split``."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises many types for a damaged folder
        raise DataError(f"{name}: could not load the saved dataset ({_first_line(e)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split not in loaded:
            raise DataError(
                f"{name}: the saved DatasetDict has no split {split!r} (splits: "
                f"{', '.join(splits)}); choose one with --hf-split"
            )
        return loaded[split]
    return loaded


def _load_hub(source: str, hf_config: str | None, hf_split: str, *, streaming: bool = False) -> Any:
    missing = f"{source}: no such file or folder"
    if not _HUB_NAME.fullmatch(source) or source.lower().endswith(TEXT_SUFFIXES + RECORD_SUFFIXES):
        raise DataError(missing)
    try:
        import datasets

        stream = {"streaming": True} if streaming else {}
        loaded = datasets.load_dataset(source, hf_config, split=hf_split, **stream)
    except Exception as e:  # offline, unknown name, bad config or split: all mean the same here
        raise DataError(
            f"{missing}, and it could not be loaded as a Hugging Face Hub dataset "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None
    if not isinstance(loaded, datasets.IterableDataset if streaming else datasets.Dataset):
        raise DataError(f"{source}: expected one split of a dataset, got a {type(loaded).__name__}")
    return loaded


# ---------------------------------------------------------------------------- records


def _text_field(
    record: Mapping[str, Any], name: str, where: str, column: str, flag: str
) -> str | None:
    """The stripped text in ``column``, or None when it is empty or null."""
    if column not in record:
        raise _missing_column(name, where, column, flag, list(record))
    value = record[column]
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(
            f"{name}, {where}: column {column!r} holds a {type(value).__name__} "
            f"({_short.repr(value)}); expected text (a string)"
        )
    return value.strip() or None


def _missing_column(name: str, where: str, column: str, flag: str, present: list) -> DataError:
    have = ", ".join(repr(c) for c in present) or "none"
    return DataError(
        f"{name}, {where}: no column {column!r} (columns present: {have}); "
        f"name the right column with {flag}"
    )


def _check_columns(name: str, where: str, present: list, columns: Mapping[str, str]) -> None:
    for column, flag in columns.items():
        if column not in present:
            raise _missing_column(name, where, column, flag, present)


def _file_records(
    path: Path, name: str, encoding: str, columns: Mapping[str, str], skipped: Skipped
) -> tuple[str, Iterator[Record]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return name, _parquet_records(path, name, columns)
    if path.stat().st_size == 0:
        skipped.add(EMPTY_FILE, name)
        return name, iter(())
    check_not_binary(path, name, encoding)
    if suffix in (".csv", ".tsv"):
        return name, _csv_records(path, name, encoding, columns, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json" and first_char(path, name, encoding) == "[":
        return name, _json_list_records(path, name, encoding)
    return name, _jsonl_records(path, name, encoding)


def _jsonl_records(path: Path, name: str, encoding: str) -> Iterator[Record]:
    for line_no, line, _ in read_lines(path, name, encoding):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name}, line {line_no}: not valid JSON ({e.msg} at column {e.colno}); "
                "expected one JSON object per line"
            ) from None
        except RecursionError:
            raise DataError(f"{name}, line {line_no}: JSON nested too deeply") from None
        yield f"line {line_no}", _as_object(value, name, f"line {line_no}")


def _json_list_records(path: Path, name: str, encoding: str) -> Iterator[Record]:
    with decoding(path, name, encoding), open(path, encoding=reading_codec(encoding)) as f:
        text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{name}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}); "
            "expected a JSON list of objects, or one JSON object per line"
        ) from None
    except RecursionError:
        raise DataError(f"{name}: JSON nested too deeply") from None
    del text
    if not isinstance(value, list):
        raise DataError(f"{name}: expected a JSON list of objects, found a {type(value).__name__}")
    for index, item in enumerate(value):
        where = f"record index {index}"
        yield where, _as_object(item, name, where)


def _as_object(value: Any, name: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise DataError(
            f'{name}, {where}: expected a JSON object such as {{"text": "..."}}, '
            f"found a {type(value).__name__} ({_short.repr(value)})"
        )
    return value


def _csv_records(
    path: Path, name: str, encoding: str, columns: Mapping[str, str], delimiter: str
) -> Iterator[Record]:
    _allow_large_csv_fields()
    with (
        decoding(path, name, encoding),
        open(path, encoding=reading_codec(encoding), newline="") as f,
    ):
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, [])
            _check_columns(name, "header (line 1)", header, columns)
            indices = {column: header.index(column) for column in columns}
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{name}, line {reader.line_num}: {len(row)} fields, but the header "
                        f"has {len(header)}; expected one field per column (quote fields "
                        "that hold the delimiter)"
                    )
                yield f"line {reader.line_num}", {c: row[i] for c, i in indices.items()}
        except csv.Error as e:
            raise DataError(f"{name}, line {reader.line_num}: malformed CSV ({e})") from None


def _allow_large_csv_fields() -> None:
    # The default limit (128 KiB) rejects long documents; raise it to the largest the platform
    # accepts.
    limit = sys.maxsize
    while limit > csv.field_size_limit():
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def _parquet_records(path: Path, name: str, columns: Mapping[str, str]) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable parquet file ({_first_line(e)})") from None
    _check_columns(name, "schema", parquet.schema_arrow.names, columns)
    wanted = list(columns)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=wanted):
            values = [batch.column(c).to_pylist() for c in wanted]
            for fields in zip(*values, strict=True):
                yield f"row index {row}", dict(zip(wanted, fields, strict=True))
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}, row index {row}: unreadable parquet data ({e})") from None


def _dataset_records(dataset: Any, name: str, columns: Mapping[str, str]) -> Iterator[Record]:
    if dataset.column_names is not None:  # a streamed dataset may not know its columns
        _check_columns(name, "features", list(dataset.column_names), columns)
    wanted = list(columns)
    row = 0
    for batch in dataset.select_columns(wanted).iter(batch_size=_BATCH_ROWS):
        for fields in zip(*(batch[c] for c in wanted), strict=True):
            yield f"row index {row}", dict(zip(wanted, fields, strict=True))
            row += 1


# ---------------------------------------------------------------------------- helpers


def _quoted(columns: Mapping[str, str]) -> str:
    return " and ".join(repr(c) for c in columns)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
