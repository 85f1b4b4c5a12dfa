"""Prepared data on disk, read without loading it.

* Documents and (document, summary) pairs are Arrow IPC files, opened with ``pa.memory_map``:
  :class:`TextTable` and :class:`PairTable` read them like lists without loading them.
* Token ids are flat int32 files, read a slice at a time (:class:`FileArray`);
  sequence-to-sequence examples are a flat token file plus an int64 offsets file
  (:class:`Ragged`), so no example is a Python object.
* They live in prepared folders of the cache, each built by one process, completed atomically
  and checked against its recorded sizes and checksums before use
  (:class:`data.cache.CacheDir`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from model.files import atomic_path

# Rows per Arrow record batch: iteration and writes hold one batch of strings at a time.
BATCH_ROWS = 4096


def digest(*parts) -> str:
    """A short stable hash of strings/numbers (never of a corpus's contents)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode("utf-8", "surrogatepass"))
        h.update(b"\x01")
    return h.hexdigest()[:20]


def content_digest(items: Iterable) -> str:
    """Hash of in-memory strings or string tuples (small inputs given as lists)."""
    h = hashlib.sha256()
    for item in items:
        for part in item if isinstance(item, tuple) else (item,):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------- Arrow tables


class TableWriter:
    """Rows appended one at a time, written in record batches of :data:`BATCH_ROWS`."""

    def __init__(self, path: Path, columns: tuple[str, ...]) -> None:
        self.columns = columns
        self.schema = pa.schema([(c, pa.large_string()) for c in columns])
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._rows: list[list[str]] = [[] for _ in columns]
        self.count = 0

    def add(self, *values: str) -> None:
        for column, value in zip(self._rows, values, strict=True):
            column.append(value)
        self.count += 1
        if len(self._rows[0]) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows[0]:
            self._writer.write_batch(
                pa.record_batch([pa.array(c, pa.large_string()) for c in self._rows], self.schema)
            )
            self._rows = [[] for _ in self.columns]

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()


def open_table(path: Path) -> pa.Table:
    """An Arrow IPC file, memory-mapped (nothing is read until used)."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


class Table:
    """Rows of an Arrow IPC file: random access through a memory map, sequential passes
    through plain reads of one record batch at a time (so a pass over a big file does not
    leave it all mapped into the process)."""

    columns: tuple[str, ...] = ()

    def __init__(self, path: Path, key: str, num_chars: int | None = None) -> None:
        self.path, self.key, self._num_chars = Path(path), key, num_chars
        self.table = open_table(self.path)

    def __reduce__(self):
        # Worker processes reopen the file; the mapped data itself is never pickled.
        return (type(self), (self.path, self.key, self._num_chars))

    def __len__(self) -> int:
        return self.table.num_rows

    def __bool__(self) -> bool:
        return len(self) > 0

    @property
    def num_batches(self) -> int:
        return self.table.column(0).num_chunks

    def read_batch(self, index: int) -> list:
        with pa.OSFile(str(self.path), "r") as f:
            batch = pa.ipc.open_file(f).get_batch(index)
            return self._rows(*(batch.column(c).to_pylist() for c in self.columns))

    def batches(self) -> Iterator[list]:
        with pa.OSFile(str(self.path), "r") as f:
            reader = pa.ipc.open_file(f)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                yield self._rows(*(batch.column(c).to_pylist() for c in self.columns))

    def __iter__(self) -> Iterator:
        for batch in self.batches():
            yield from batch

    def __getitem__(self, index):
        if isinstance(index, slice):
            cols = [self.table.column(c)[index].to_pylist() for c in self.columns]
            return self._rows(*cols)
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._rows(*([self.table.column(c)[index].as_py()] for c in self.columns))[0]

    def __add__(self, other) -> Chain:
        return Chain([self, other])

    def _rows(self, *cols: list) -> list:
        raise NotImplementedError


class TextTable(Table):
    """Documents (one Arrow string column, ``text``), read like a list of strings."""

    columns = ("text",)

    def _rows(self, texts: list) -> list:
        return texts

    @property
    def num_chars(self) -> int:
        if self._num_chars is None:
            self._num_chars = sum(len(t) for b in self.batches() for t in b)
        return self._num_chars


class PairTable(Table):
    """(document, summary) pairs (Arrow columns ``document``, ``summary``), read like a list
    of tuples."""

    columns = ("document", "summary")

    def _rows(self, documents: list, summaries: list) -> list:
        return list(zip(documents, summaries, strict=True))


class ListDocs:
    """An in-memory list (small inputs, such as evaluation files) with the tables' API."""

    def __init__(self, items: list) -> None:
        self.items = list(items)
        self.key = content_digest(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_batches(self) -> int:
        return -(-len(self.items) // BATCH_ROWS)

    def read_batch(self, index: int) -> list:
        return self.items[index * BATCH_ROWS : (index + 1) * BATCH_ROWS]


def as_docs(items):
    """A table as it is; a list (or any iterable) wrapped into :class:`ListDocs`."""
    return items if isinstance(items, Table | ListDocs) else ListDocs(items)


class Chain:
    """Sequences one after another, iterated lazily (``table + list`` keeps working)."""

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __iter__(self) -> Iterator:
        for part in self.parts:
            yield from part

    def __add__(self, other) -> Chain:
        return Chain([*self.parts, other])

    @property
    def num_chars(self) -> int:
        return sum(num_chars(p) for p in self.parts)


def num_chars(texts) -> int:
    if hasattr(texts, "num_chars"):
        return texts.num_chars
    return sum(len(t) for t in texts)


# ---------------------------------------------------------------------------- token arrays


def write_array(path: Path, array: np.ndarray) -> None:
    """``array``'s values as a flat file, written atomically (processes may share the cache)."""
    with atomic_path(path, unique=True) as tmp, open(tmp, "wb") as f:
        f.write(np.ascontiguousarray(array).tobytes())


class FileArray:
    """A flat file of ``dtype`` values, read a slice at a time with ``os.pread``.

    Training reads scattered blocks of a file that can be larger than memory. A memory map of
    it counted what it touched as this process's resident memory: about 300 KB for each
    508-byte block read from a 1 GB token file (the kernel maps the page cache's large folios
    whole, ``MADV_RANDOM`` or not), 300 MB over 30 batches. Read with ``pread``, the pages stay
    in the operating system's cache, which it can reclaim, and the process holds only the
    slices. ``np.asarray`` of the whole array maps the file (for whole-array arithmetic such as
    ``np.diff`` of offsets). Pickles by path, so worker processes reopen it.
    """

    def __init__(self, path: Path, dtype) -> None:
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._fd: int | None = None
        self._len = self.path.stat().st_size // self.dtype.itemsize

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def __len__(self) -> int:
        return self._len

    @property
    def shape(self) -> tuple[int]:
        return (self._len,)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self._len)
            if step != 1:
                return np.asarray(self)[key]
            count, size = max(stop - start, 0), self.dtype.itemsize
            data = os.pread(self._file(), count * size, start * size)
            if len(data) != count * size:
                raise OSError(f"{self.path}: read {len(data)} of {count * size} bytes at {start}")
            return np.frombuffer(data, dtype=self.dtype)
        index = int(key)
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} values in {self.path}")
        index %= self._len
        return self[index : index + 1][0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.memmap(self.path, dtype=self.dtype, mode="r")
        return array if dtype is None else array.astype(dtype)

    def __getstate__(self) -> dict:
        return {"path": self.path, "dtype": self.dtype, "_len": self._len, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def open_array(path: Path, dtype) -> np.ndarray | FileArray:
    """A flat file of ``dtype`` values, read-only: a :class:`FileArray` (read by slices), or an
    empty array for an empty file."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return FileArray(path, dtype)


def concat_files(parts: list[Path], out: Path) -> None:
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)


class Ragged:
    """Variable-length int32 sequences: one flat array and ``len + 1`` offsets."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_list(cls, seqs) -> Ragged:
        seqs = [np.asarray(s, dtype=np.int32) for s in seqs]
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int32)
        return cls(flat.astype(np.int32, copy=False), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = self.offsets[index : index + 2]  # one read of a token file's offsets
        return np.asarray(self.flat[start:end])

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))
