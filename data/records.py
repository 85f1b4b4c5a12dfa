"""Records of structured files (jsonl, json, csv, tsv, parquet) and of datasets, one at a time,
each with where it is ("line 7", "row index 3"), and their text fields checked: a missing
column or a field that is not text is a :class:`~data.reading.DataError` naming the record."""

from __future__ import annotations

import csv
import json
import reprlib
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from data.reading import (
    EMPTY_FILE,
    DataError,
    Skipped,
    check_not_binary,
    decoding,
    first_char,
    first_line,
    read_lines,
    reading_codec,
)

Record = tuple[str, Mapping[str, Any]]
"""Where the record is ("line 7", "row index 3") and its fields."""

_BATCH_ROWS = 1024
_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40


def text_field(
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


def file_records(
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


def _parse_json(text: str, name: str, expected: str, line_no: int | None = None) -> Any:
    """``text`` parsed; a :class:`DataError` naming the line otherwise (``line_no``: the line
    ``text`` is, in a JSON-lines file; else the line the parser stopped at)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = e.lineno if line_no is None else line_no
        raise DataError(
            f"{name}, line {line}: not valid JSON ({e.msg} at column {e.colno}); "
            f"expected {expected}"
        ) from None
    except RecursionError:
        where = "" if line_no is None else f", line {line_no}"
        raise DataError(f"{name}{where}: JSON nested too deeply") from None


def _jsonl_records(path: Path, name: str, encoding: str) -> Iterator[Record]:
    for line_no, line, _ in read_lines(path, name, encoding):
        if not line.strip():
            continue
        value = _parse_json(line, name, "one JSON object per line", line_no)
        yield f"line {line_no}", _as_object(value, name, f"line {line_no}")


def _json_list_records(path: Path, name: str, encoding: str) -> Iterator[Record]:
    with decoding(path, name, encoding), open(path, encoding=reading_codec(encoding)) as f:
        text = f.read()
    value = _parse_json(text, name, "a JSON list of objects, or one JSON object per line")
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
        raise DataError(f"{name}: not a readable parquet file ({first_line(e)})") from None
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


def dataset_records(dataset: Any, name: str, columns: Mapping[str, str]) -> Iterator[Record]:
    if dataset.column_names is not None:  # a streamed dataset may not know its columns
        _check_columns(name, "features", list(dataset.column_names), columns)
    wanted = list(columns)
    row = 0
    for batch in dataset.select_columns(wanted).iter(batch_size=_BATCH_ROWS):
        for fields in zip(*(batch[c] for c in wanted), strict=True):
            yield f"row index {row}", dict(zip(wanted, fields, strict=True))
            row += 1
