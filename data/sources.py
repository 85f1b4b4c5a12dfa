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

import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.reading import (
    EMPTY_DOCUMENT,
    EMPTY_SUMMARY,
    TEXT_FILE_FOR_PAIRS,
    UNSUPPORTED_FILE,
    DataError,
    Skipped,
    check_encoding,
    chunks,
    finish,
    first_line,
    os_errors,
    plain_documents,
)
from data.records import Record, dataset_records, file_records, text_field

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SPLIT_MODES = ("line", "block", "file")

# Hub ids look like "name" or "owner/name"; anything else that does not exist is a bad path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

# (document, summary) pairs cannot come from plain text; a message says so in several places.
_PAIR_FORMATS = "a .jsonl, .json, .csv, .tsv or .parquet file or a dataset"


# ---------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Reading:
    """How a source is opened: a hub dataset's configuration and split (also the split of a
    saved DatasetDict), and the text encoding of plain-text, jsonl and csv files."""

    hf_config: str | None = None
    hf_split: str = "train"
    encoding: str = "utf-8"


def iter_texts(
    source: str,
    *,
    text_column: str = "text",
    split: str = "line",
    reading: Reading | None = None,
    max_chars: int = 1_000_000,
    streaming: bool = False,
) -> Iterator[str]:
    """Documents for the self-supervised objectives, one at a time (none is kept).

    ``reading``: how the source is opened (:class:`Reading`; None: its defaults). Plain text
    files are split into documents by ``split``: ``"line"`` (one document per
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
    reading = reading or Reading()
    encoding = reading.encoding
    yield from _read(
        source,
        [(text_column, "--text-column", EMPTY_DOCUMENT)],
        reading,
        "documents",
        plain=lambda path, skipped: plain_documents(path, split, encoding, max_chars, skipped),
        rows=lambda fields: chunks(fields[0], max_chars),
        streaming=streaming,
    )


def read_source_texts(source: str, **kwargs) -> list[str]:
    """:func:`iter_texts` as a list (same arguments, same errors)."""
    return list(iter_texts(source, **kwargs))


def iter_pairs(
    source: str,
    *,
    document_column: str = "document",
    summary_column: str = "summary",
    reading: Reading | None = None,
) -> Iterator[tuple[str, str]]:
    """(document, summary) pairs for supervised summarization, one at a time.

    Pairs come from records (jsonl, json, csv, tsv, parquet, datasets); plain text files in a
    folder are skipped and counted. Both fields are stripped of leading and trailing
    whitespace; pairs where either is empty (or null) are skipped and counted in one warning.
    Documents are not cut: cutting would separate a document from its summary.

    Raises:
        DataError: the source is missing, unreadable or malformed, or holds no pairs.
    """
    columns = [
        (document_column, "--document-column", EMPTY_DOCUMENT),
        (summary_column, "--summary-column", EMPTY_SUMMARY),
    ]
    yield from _read(
        source,
        columns,
        reading or Reading(),
        "(document, summary) pairs",
        plain=None,
        rows=lambda fields: [tuple(fields)],
    )


def read_source_pairs(source: str, **kwargs) -> list[tuple[str, str]]:
    """:func:`iter_pairs` as a list (same arguments, same errors)."""
    return list(iter_pairs(source, **kwargs))


def _read(
    source: str,
    columns: list[tuple[str, str, tuple[str, str]]],
    reading: Reading,
    what: str,
    *,
    plain: Callable[[Path, Skipped], Iterator[str]] | None,
    rows: Callable[[list[str]], Iterable],
    streaming: bool = False,
) -> Iterator:
    """What ``source`` holds, one row at a time: ``plain(path, skipped)`` of a plain text file
    (None: plain text is no input here), ``rows(fields)`` of each record, its ``columns``
    ((column, flag naming it, skip reason when it is empty)) read as text. A record with an
    empty field is skipped and counted; every skip is reported in one warning at the end."""
    skipped = Skipped()
    flags = {column: flag for column, flag, _ in columns}
    count = 0
    with os_errors(source):
        for unit in _units(
            source, reading, flags, skipped, pairs=plain is None, streaming=streaming
        ):
            if isinstance(unit, Path):
                assert plain is not None  # _units yields no plain text when pairs=True
                found = plain(unit, skipped)
            else:
                found = _record_rows(*unit, columns, skipped, rows)
            for row in found:
                count += 1
                yield row
    finish(count, source, skipped, what)


def _record_rows(
    name: str,
    records: Iterator[Record],
    columns: list[tuple[str, str, tuple[str, str]]],
    skipped: Skipped,
    rows: Callable[[list[str]], Iterable],
) -> Iterator:
    for where, record in records:
        fields = [text_field(record, name, where, column, flag) for column, flag, _ in columns]
        if None in fields:
            skipped.add(columns[fields.index(None)][2], name)
        else:
            yield from rows(fields)


# ---------------------------------------------------------------------------- source resolution

# A unit is a plain text file to read, or a (name, records) pair.
_Unit = Path | tuple[str, Iterator[Record]]


def _units(
    source: str,
    reading: Reading,
    columns: Mapping[str, str],
    skipped: Skipped,
    *,
    pairs: bool,
    streaming: bool = False,
) -> Iterator[_Unit]:
    check_encoding(reading.encoding)
    hf_split, encoding = reading.hf_split, reading.encoding
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            yield source, dataset_records(_load_saved(path, source, hf_split), source, columns)
        else:
            yield from _folder_units(path, source, reading, columns, skipped, pairs=pairs)
    elif path.is_file():
        if path.suffix.lower() in RECORD_SUFFIXES:
            yield file_records(path, source, encoding, columns, skipped)
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
        loaded = _load_hub(source, reading.hf_config, hf_split, streaming=streaming)
        yield source, dataset_records(loaded, source, columns)


def _folder_units(
    folder: Path,
    source: str,
    reading: Reading,
    columns: Mapping[str, str],
    skipped: Skipped,
    *,
    pairs: bool,
) -> Iterator[_Unit]:
    hf_split, encoding = reading.hf_split, reading.encoding
    found = False
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        # Sorted walks give the same documents in the same order on every machine.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if here != folder and _is_saved_dataset(here):
            dirnames[:] = []
            found = True
            name = str(here)
            yield name, dataset_records(_load_saved(here, name, hf_split), name, columns)
            continue
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = here / filename
            suffix = path.suffix.lower()
            if suffix in RECORD_SUFFIXES:
                found = True
                yield file_records(path, str(path), encoding, columns, skipped)
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


def _datasets() -> Any:
    """The ``datasets`` package with its progress bars off (the trainer reports its own
    progress). Imported only where a saved or hub dataset is read: with pandas, which it
    imports, it adds about 55 MiB to a run's resident memory."""
    import datasets
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    return datasets


def _load_saved(folder: Path, name: str, split: str) -> Any:
    """A folder written by ``save_to_disk``; for a DatasetDict, its ``split``."""
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises many types for a damaged folder
        raise DataError(f"{name}: could not load the saved dataset ({first_line(e)})") from None
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
    datasets = _datasets()
    try:
        stream = {"streaming": True} if streaming else {}
        loaded = datasets.load_dataset(source, hf_config, split=hf_split, **stream)
    except Exception as e:  # offline, unknown name, bad config or split: all mean the same here
        raise DataError(
            f"{missing}, and it could not be loaded as a Hugging Face Hub dataset "
            f"({type(e).__name__}: {first_line(e)})"
        ) from None
    if not isinstance(loaded, datasets.IterableDataset if streaming else datasets.Dataset):
        raise DataError(f"{source}: expected one split of a dataset, got a {type(loaded).__name__}")
    return loaded


# ---------------------------------------------------------------------------- helpers


def _quoted(columns: Mapping[str, str]) -> str:
    return " and ".join(repr(c) for c in columns)
