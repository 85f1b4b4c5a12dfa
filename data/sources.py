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

import codecs
import csv
import json
import logging
import os
import re
import reprlib
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SPLIT_MODES = ("line", "block", "file")

_BINARY_PROBE_BYTES = 8192
# Plain text is read in pieces of at most this many characters, so a file that is one huge
# line never exists in memory as a single string besides the chunks returned.
_PIECE_CHARS = 1 << 20
_BATCH_ROWS = 1024
# Hub ids look like "name" or "owner/name"; anything else that does not exist is a bad path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_BOMS = {
    codecs.BOM_UTF32_LE: "utf-32",
    codecs.BOM_UTF32_BE: "utf-32",
    codecs.BOM_UTF16_LE: "utf-16",
    codecs.BOM_UTF16_BE: "utf-16",
}
_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40

# (document, summary) pairs cannot come from plain text; a message says so in several places.
_PAIR_FORMATS = "a .jsonl, .json, .csv, .tsv or .parquet file or a dataset"

Record = tuple[str, Mapping[str, Any]]
"""Where the record is ("line 7", "row index 3") and its fields."""


class DataError(ValueError):
    """Bad input data. The message always names the source (file path or dataset), the record
    (line number / row index / record index) when there is one, and what was expected."""


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
) -> Iterator[str]:
    """Documents for the self-supervised objectives, one at a time (none is kept).

    Plain text files are split into documents by ``split``: ``"line"`` (one document per
    non-empty line), ``"block"`` (documents separated by blank lines) or ``"file"`` (the whole
    file). Records give one document each, from ``text_column``.

    Each document is stripped of leading and trailing whitespace. A document longer than
    ``max_chars`` characters is cut into chunks of at most ``max_chars`` characters, at the
    last whitespace of each chunk's second half where there is one, so no downstream step
    sees a giant string. Empty documents (and nulls) are skipped and counted in one warning.

    Raises:
        DataError: the source is missing, unreadable or malformed, or holds no documents.
    """
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_MODES)}, not {split!r}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, not {max_chars}")
    skipped = _Skipped()
    columns = {text_column: "--text-column"}
    count = 0
    with _os_errors(source):
        for unit in _units(source, hf_config, hf_split, encoding, columns, skipped, pairs=False):
            if isinstance(unit, Path):
                for doc in _plain_documents(unit, split, encoding, max_chars, skipped):
                    count += 1
                    yield doc
                continue
            name, records = unit
            for where, record in records:
                text = _text_field(record, name, where, text_column, "--text-column")
                if text is None:
                    skipped.add(_EMPTY_DOCUMENT, name)
                else:
                    for doc in _chunks(text, max_chars):
                        count += 1
                        yield doc
    _finish(count, source, skipped, "documents")


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
    skipped = _Skipped()
    columns = {document_column: "--document-column", summary_column: "--summary-column"}
    count = 0
    with _os_errors(source):
        for unit in _units(source, hf_config, hf_split, encoding, columns, skipped, pairs=True):
            assert not isinstance(unit, Path)  # _units yields no plain text when pairs=True
            name, records = unit
            for where, record in records:
                document = _text_field(record, name, where, document_column, "--document-column")
                summary = _text_field(record, name, where, summary_column, "--summary-column")
                if document is None:
                    skipped.add(_EMPTY_DOCUMENT, name)
                elif summary is None:
                    skipped.add(_EMPTY_SUMMARY, name)
                else:
                    count += 1
                    yield document, summary
    _finish(count, source, skipped, "(document, summary) pairs")


def read_pairs(source: str, **kwargs) -> list[tuple[str, str]]:
    """:func:`iter_pairs` as a list (same arguments, same errors)."""
    return list(iter_pairs(source, **kwargs))


# ---------------------------------------------------------------------------- skip accounting

_EMPTY_DOCUMENT = ("empty document", "empty documents")
_EMPTY_SUMMARY = ("empty summary", "empty summaries")
_EMPTY_FILE = ("empty file", "empty files")
_TEXT_FILE_FOR_PAIRS = (
    "plain text file (pairs need records)",
    "plain text files (pairs need records)",
)
_UNSUPPORTED_FILE = ("file of an unsupported type", "files of unsupported types")


class _Skipped:
    """Counts what was skipped, per reason and per file, to report it once at the end."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], Counter[str]] = {}

    def add(self, reason: tuple[str, str], name: str) -> None:
        self._counts.setdefault(reason, Counter())[name] += 1

    def summary(self, source: str) -> str:
        parts = []
        for (singular, plural), per_name in self._counts.items():
            total = sum(per_name.values())
            text = f"{total} {singular if total == 1 else plural}"
            names = [n for n in per_name if n != source]
            if names:
                shown = ", ".join(f"{n}: {per_name[n]}" for n in names[:3])
                more = f", and {len(names) - 3} more files" if len(names) > 3 else ""
                text += f" ({shown}{more})"
            parts.append(text)
        return "; ".join(parts)


@contextmanager
def _os_errors(source: str) -> Iterator[None]:
    # Unreadable files (permissions, a file removed while reading) are data problems too.
    try:
        yield
    except OSError as e:
        raise DataError(f"{e.filename or source}: cannot read ({e.strerror or e})") from None


def _finish(count: int, source: str, skipped: _Skipped, what: str) -> None:
    summary = skipped.summary(source)
    if not count:
        detail = f" (skipped {summary})" if summary else ""
        raise DataError(f"no {what} found in {source}{detail}")
    if summary:
        log.warning("%s: skipped %s", source, summary)


# ---------------------------------------------------------------------------- source resolution

# A unit is a plain text file to read, or a (name, records) pair.
_Unit = Path | tuple[str, Iterator[Record]]


def _units(
    source: str,
    hf_config: str | None,
    hf_split: str,
    encoding: str,
    columns: Mapping[str, str],
    skipped: _Skipped,
    *,
    pairs: bool,
) -> Iterator[_Unit]:
    _check_encoding(encoding)
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
        yield source, _dataset_records(_load_hub(source, hf_config, hf_split), source, columns)


def _folder_units(
    folder: Path,
    source: str,
    hf_split: str,
    encoding: str,
    columns: Mapping[str, str],
    skipped: _Skipped,
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
                    skipped.add(_TEXT_FILE_FOR_PAIRS, str(path))
                else:
                    yield path
            else:
                skipped.add(_UNSUPPORTED_FILE, str(path))
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


def _load_hub(source: str, hf_config: str | None, hf_split: str) -> Any:
    missing = f"{source}: no such file or folder"
    if not _HUB_NAME.fullmatch(source) or source.lower().endswith(TEXT_SUFFIXES + RECORD_SUFFIXES):
        raise DataError(missing)
    try:
        import datasets

        loaded = datasets.load_dataset(source, hf_config, split=hf_split)
    except Exception as e:  # offline, unknown name, bad config or split: all mean the same here
        raise DataError(
            f"{missing}, and it could not be loaded as a Hugging Face Hub dataset "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None
    if not isinstance(loaded, datasets.Dataset):
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
    path: Path, name: str, encoding: str, columns: Mapping[str, str], skipped: _Skipped
) -> tuple[str, Iterator[Record]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return name, _parquet_records(path, name, columns)
    if path.stat().st_size == 0:
        skipped.add(_EMPTY_FILE, name)
        return name, iter(())
    _check_not_binary(path, name, encoding)
    if suffix in (".csv", ".tsv"):
        return name, _csv_records(path, name, encoding, columns, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json" and _first_char(path, name, encoding) == "[":
        return name, _json_list_records(path, name, encoding)
    return name, _jsonl_records(path, name, encoding)


def _jsonl_records(path: Path, name: str, encoding: str) -> Iterator[Record]:
    for line_no, line, _ in _read_lines(path, name, encoding):
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
    with _decoding(path, name, encoding), open(path, encoding=_reading_codec(encoding)) as f:
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
        _decoding(path, name, encoding),
        open(path, encoding=_reading_codec(encoding), newline="") as f,
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
    _check_columns(name, "features", list(dataset.column_names), columns)
    wanted = list(columns)
    row = 0
    for batch in dataset.select_columns(wanted).iter(batch_size=_BATCH_ROWS):
        for fields in zip(*(batch[c] for c in wanted), strict=True):
            yield f"row index {row}", dict(zip(wanted, fields, strict=True))
            row += 1


# ---------------------------------------------------------------------------- plain text


def _plain_documents(
    path: Path, split: str, encoding: str, max_chars: int, skipped: _Skipped
) -> Iterator[str]:
    name = str(path)
    if path.stat().st_size == 0:
        skipped.add(_EMPTY_FILE, name)
        return
    _check_not_binary(path, name, encoding)
    chunker = _Chunker(max_chars)
    produced = 0
    line_start = True
    for _, piece, line_end in _read_lines(path, name, encoding, min(max_chars, _PIECE_CHARS)):
        if split == "line":
            chunks = chunker.add(piece)
            if line_end:
                chunks += chunker.close()
        elif split == "block" and line_start and line_end and not piece.strip():
            chunks = chunker.close()
        else:
            chunks = chunker.add(piece)
        produced += len(chunks)
        yield from chunks
        line_start = line_end
    last = chunker.close()
    produced += len(last)
    yield from last
    if not produced:
        skipped.add(_EMPTY_FILE, name)


def _chunks(text: str, max_chars: int) -> list[str]:
    if len(text) <= max_chars:
        return [text]
    chunker = _Chunker(max_chars)
    return chunker.add(text) + chunker.close()


class _Chunker:
    """Cuts a stream of text into stripped chunks of at most ``max_chars`` characters,
    preferring whitespace boundaries."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self._parts: list[str] = []
        self._size = 0

    def add(self, text: str) -> list[str]:
        self._parts.append(text)
        self._size += len(text)
        if self._size <= self.max_chars:
            return []
        buffer = "".join(self._parts)
        chunks = []
        while len(buffer) > self.max_chars:
            cut = _cut_point(buffer, self.max_chars)
            chunk = buffer[:cut].strip()
            if chunk:
                chunks.append(chunk)
            buffer = buffer[cut:].lstrip()
        self._parts, self._size = [buffer], len(buffer)
        return chunks

    def close(self) -> list[str]:
        text = "".join(self._parts).strip()
        self._parts, self._size = [], 0
        return [text] if text else []


def _cut_point(text: str, limit: int) -> int:
    """Where to cut ``text`` so the first part has at most ``limit`` characters: at the last
    whitespace in the second half of that window, or hard at ``limit`` when there is none."""
    lowest = limit // 2
    best = max(text.rfind(space, lowest, limit + 1) for space in " \n\t\r\f\v")
    return best if best > 0 else limit


# ---------------------------------------------------------------------------- decoding


def _check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}") from None


def _reading_codec(encoding: str) -> str:
    # A UTF-8 byte-order mark is noise, not text: drop it when reading UTF-8.
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _wide_encoding(encoding: str) -> bool:
    return codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))


def _check_not_binary(path: Path, name: str, encoding: str) -> None:
    with open(path, "rb") as f:
        head = f.read(_BINARY_PROBE_BYTES)
    if _wide_encoding(encoding):
        return  # UTF-16/32 text is full of NUL bytes
    for bom, wide in _BOMS.items():
        if head.startswith(bom):
            raise DataError(
                f"{name}: starts with a {wide.upper()} byte-order mark but is read as "
                f"{encoding}; set the encoding option (--encoding) to {wide!r}"
            )
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"{name}: looks like a binary file (NUL byte at byte offset {nul}); expected "
            f"text in {encoding}"
        )


@contextmanager
def _decoding(path: Path, name: str, encoding: str) -> Iterator[None]:
    """Turns a decoding error anywhere in the block into a DataError naming line and byte."""
    try:
        yield
    except UnicodeDecodeError:
        raise _decode_error(path, name, encoding) from None


def _read_lines(
    path: Path, name: str, encoding: str, limit: int = -1
) -> Iterator[tuple[int, str, bool]]:
    """(line number, piece, piece ends the line) for each piece of at most ``limit``
    characters (whole lines when ``limit`` is -1)."""
    line_no = 1
    line_end = True
    with _decoding(path, name, encoding), open(path, encoding=_reading_codec(encoding)) as f:
        while piece := f.readline(limit):
            line_end = piece.endswith("\n") or len(piece) != limit
            yield line_no, piece, line_end
            if line_end:
                line_no += 1
    if not line_end:  # the file ended inside a long line
        yield line_no, "", True


def _first_char(path: Path, name: str, encoding: str) -> str:
    with _decoding(path, name, encoding), open(path, encoding=_reading_codec(encoding)) as f:
        while piece := f.read(4096):
            stripped = piece.lstrip()
            if stripped:
                return stripped[0]
    return ""


def _decode_error(path: Path, name: str, encoding: str) -> DataError:
    """Finds the first undecodable byte by a second, binary pass: text-mode reading reports
    only offsets inside its internal buffer."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = newlines = 0
    newline = b"\n" if "\n".encode(encoding) == b"\n" else None
    reason = "undecodable bytes"
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            pending = decoder.getstate()[0]
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                data = pending + block
                before = data[: e.start]
                if newline is not None:
                    newlines += before.count(newline)
                else:
                    newlines += codecs.decode(before, encoding, "replace").count("\n")
                offset += e.start - len(pending)
                reason = e.reason
                break
            if not block:
                break
            newlines += text.count("\n")
            offset += len(block)
    return DataError(
        f"{name}, line {newlines + 1} (byte offset {offset}): cannot decode as {encoding} "
        f"({reason}); if the file uses another encoding, set the encoding option "
        "(--encoding), e.g. 'latin-1' or 'cp1252'"
    )


# ---------------------------------------------------------------------------- helpers


def _quoted(columns: Mapping[str, str]) -> str:
    return " and ".join(repr(c) for c in columns)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
