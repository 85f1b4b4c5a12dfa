"""Reading files, below the sources: the error type, the count of what was skipped, decoding
plain text (encodings, byte-order marks, binary files, an error that names the line and byte),
splitting it into documents and cutting very long ones at whitespace."""

from __future__ import annotations

import codecs
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("data.sources")

_BINARY_PROBE_BYTES = 8192
# Plain text is read in pieces of at most this many characters, so a file that is one huge
# line never exists in memory as a single string besides the chunks returned.
_PIECE_CHARS = 1 << 20
_BOMS = {
    codecs.BOM_UTF32_LE: "utf-32",
    codecs.BOM_UTF32_BE: "utf-32",
    codecs.BOM_UTF16_LE: "utf-16",
    codecs.BOM_UTF16_BE: "utf-16",
}


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class DataError(ValueError):
    """Bad input data. The message always names the source (file path or dataset), the record
    (line number / row index / record index) when there is one, and what was expected."""


# ---------------------------------------------------------------------------- skip accounting

EMPTY_DOCUMENT = ("empty document", "empty documents")
EMPTY_SUMMARY = ("empty summary", "empty summaries")
EMPTY_FILE = ("empty file", "empty files")
TEXT_FILE_FOR_PAIRS = (
    "plain text file (pairs need records)",
    "plain text files (pairs need records)",
)
UNSUPPORTED_FILE = ("file of an unsupported type", "files of unsupported types")


class Skipped:
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
def os_errors(source: str) -> Iterator[None]:
    # Unreadable files (permissions, a file removed while reading) are data problems too.
    try:
        yield
    except OSError as e:
        raise DataError(f"{e.filename or source}: cannot read ({e.strerror or e})") from None


def finish(count: int, source: str, skipped: Skipped, what: str) -> None:
    summary = skipped.summary(source)
    if not count:
        detail = f" (skipped {summary})" if summary else ""
        raise DataError(f"no {what} found in {source}{detail}")
    if summary:
        log.warning("%s: skipped %s", source, summary)


# ---------------------------------------------------------------------------- plain text


def plain_documents(
    path: Path, split: str, encoding: str, max_chars: int, skipped: Skipped
) -> Iterator[str]:
    name = str(path)
    if path.stat().st_size == 0:
        skipped.add(EMPTY_FILE, name)
        return
    check_not_binary(path, name, encoding)
    chunker = Chunker(max_chars)
    produced = 0
    line_start = True
    for _, piece, line_end in read_lines(path, name, encoding, min(max_chars, _PIECE_CHARS)):
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
        skipped.add(EMPTY_FILE, name)


def chunks(text: str, max_chars: int) -> list[str]:
    if len(text) <= max_chars:
        return [text]
    chunker = Chunker(max_chars)
    return chunker.add(text) + chunker.close()


class Chunker:
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
            cut = cut_point(buffer, self.max_chars)
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


def cut_point(text: str, limit: int) -> int:
    """Where to cut ``text`` so the first part has at most ``limit`` characters: at the last
    whitespace in the second half of that window, or hard at ``limit`` when there is none."""
    lowest = limit // 2
    best = max(text.rfind(space, lowest, limit + 1) for space in " \n\t\r\f\v")
    return best if best > 0 else limit


# ---------------------------------------------------------------------------- decoding


def check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}") from None


def reading_codec(encoding: str) -> str:
    # A UTF-8 byte-order mark is noise, not text: drop it when reading UTF-8.
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def wide_encoding(encoding: str) -> bool:
    return codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))


def check_not_binary(path: Path, name: str, encoding: str) -> None:
    with open(path, "rb") as f:
        head = f.read(_BINARY_PROBE_BYTES)
    if wide_encoding(encoding):
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
def decoding(path: Path, name: str, encoding: str) -> Iterator[None]:
    """Turns a decoding error anywhere in the block into a DataError naming line and byte."""
    try:
        yield
    except UnicodeDecodeError:
        raise decode_error(path, name, encoding) from None


def read_lines(
    path: Path, name: str, encoding: str, limit: int = -1
) -> Iterator[tuple[int, str, bool]]:
    """(line number, piece, piece ends the line) for each piece of at most ``limit``
    characters (whole lines when ``limit`` is -1)."""
    line_no = 1
    line_end = True
    with decoding(path, name, encoding), open(path, encoding=reading_codec(encoding)) as f:
        while piece := f.readline(limit):
            line_end = piece.endswith("\n") or len(piece) != limit
            yield line_no, piece, line_end
            if line_end:
                line_no += 1
    if not line_end:  # the file ended inside a long line
        yield line_no, "", True


def first_char(path: Path, name: str, encoding: str) -> str:
    with decoding(path, name, encoding), open(path, encoding=reading_codec(encoding)) as f:
        while piece := f.read(4096):
            stripped = piece.lstrip()
            if stripped:
                return stripped[0]
    return ""


def decode_error(path: Path, name: str, encoding: str) -> DataError:
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
