"""The embedded default corpus: English technical prose that ships with every Python install.

Training machines are often offline, so the default data is built at run time from the
interpreter's documentation topics (``pydoc_data.topics``) and the docstrings of the standard
library and of the installed packages in :data:`PACKAGES`. Source files are parsed with
``ast``, never imported: importing would be slow and could have side effects.

Every topic and every docstring of at least :data:`MIN_TEXT_WORDS` words is a raw text. A
docstring that follows PEP 257 (a summary paragraph, a blank line, a longer description) also
gives a (description, summary) pair. Texts are held out for evaluation by a stable hash of the
whole docstring before texts and pairs are derived, so a held-out docstring reaches training
neither as a text nor as a pair.

Built once per :func:`corpus_key` (everything the corpus depends on): :mod:`data.raw` keeps
it as Arrow tables in the cache.
"""

from __future__ import annotations

import ast
import dataclasses
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import sys
import sysconfig
import time
import warnings
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from data.cache import mp_context, worker_count
from data.split import held_out_document, validation_document, validation_share

log = logging.getLogger(__name__)

CORPUS_VERSION = 2
"""Bump whenever extraction or filtering changes, so old caches are not reused."""

DEFAULT_MAX_CHARS: int | None = 20_000_000
"""Total characters of raw text kept by default. With torch, transformers and their
dependencies installed this gives over 20,000 texts and about 7,000 pairs, built in 10-15 s on
two cores (about 60% of all the docstrings found)."""

PACKAGES: tuple[tuple[str, str], ...] = (
    # (import name, distribution name): ours, our dependencies' and a few common ones.
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("datasets", "datasets"),
    ("tokenizers", "tokenizers"),
    ("safetensors", "safetensors"),
    ("huggingface_hub", "huggingface-hub"),
    ("numpy", "numpy"),
    ("pandas", "pandas"),
    ("pyarrow", "pyarrow"),
    ("scipy", "scipy"),
    ("sympy", "sympy"),
    ("mpmath", "mpmath"),
    ("networkx", "networkx"),
    ("jinja2", "jinja2"),
    ("fsspec", "fsspec"),
    ("filelock", "filelock"),
    ("packaging", "packaging"),
    ("yaml", "pyyaml"),
    ("requests", "requests"),
    ("urllib3", "urllib3"),
    ("tqdm", "tqdm"),
    ("dill", "dill"),
    ("rouge_score", "rouge-score"),
    ("nltk", "nltk"),
    ("absl", "absl-py"),
)

MIN_TEXT_WORDS = 20
SUMMARY_WORDS = (6, 60)
MIN_BODY_WORDS = 40
MAX_CODE_LINE_SHARE = 0.5

# Folders that hold tests, tools or copies of other projects rather than documented API.
_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "pydoc_data",
        "_vendor",
        "vendor",
        "vendored",
    }
)
# Bigger files are generated tables or test matrices, slow to parse and poor in prose.
_MAX_FILE_BYTES = 1 << 20
# Small caps finish in a few files; a process pool would cost more than it saves.
_PARALLEL_MIN_CHARS = 2_000_000
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STATEMENTS = (ast.stmt, ast.excepthandler, ast.match_case)
_SIGNATURE = re.compile(r"[\w.]+\(.*\)\s*(->|$)")
_UNDERLINE = re.compile(r"([-=~^*#])\1{2,}")
# "Args: ...", "Note: ...", "name (`type`): description"
_ARGUMENT = re.compile(r"\**\w+\s*(\([^)]*\))?\s*:")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass
class Corpus:
    train_texts: list[str]
    eval_texts: list[str]
    train_pairs: list[tuple[str, str]]
    """(document, summary)"""
    eval_pairs: list[tuple[str, str]]
    val_texts: list[str] = dataclasses.field(default_factory=list)
    """Set aside from training to pick the kept weights (:func:`validation_document`)."""
    val_pairs: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        chars = sum(map(len, self.train_texts + self.val_texts + self.eval_texts))
        return (
            f"{len(self.train_texts):,} train / {len(self.val_texts):,} validation / "
            f"{len(self.eval_texts):,} eval texts ({chars:,} chars), "
            f"{len(self.train_pairs):,} train / {len(self.val_pairs):,} validation / "
            f"{len(self.eval_pairs):,} eval pairs"
        )


def build_default_corpus(
    eval_fraction: float = 0.02,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    val_fraction: float = 0.0,
) -> Corpus:
    """The embedded corpus, built from the installed sources (:mod:`data.raw` caches it).

    ``max_chars`` caps the total characters of raw text (None: everything). Under a cap, source
    files are read in the order of a hash of their names, which interleaves all packages, until
    ``max_chars`` characters are gathered; the texts with the lowest content hashes that fit
    are kept. The same installed versions give the same corpus on every machine.
    ``eval_fraction`` of the docstrings (by :func:`held_out_document`) form the eval split;
    of the rest, the validation split is :func:`validation_share` of the docstrings that give
    pairs (of all, without pairs), drawn by :func:`validation_document`.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), not {eval_fraction}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be positive or None, not {max_chars}")
    start = time.perf_counter()
    corpus = _build(eval_fraction, max_chars, val_fraction)
    log.info(
        "built the default corpus in %.1fs: %s", time.perf_counter() - start, corpus.describe()
    )
    return corpus


# ---------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _Text:
    text: str
    docstring: bool
    """Docstrings may give pairs; documentation topics are not PEP 257 shaped."""


def _build(eval_fraction: float, max_chars: int | None, val_fraction: float = 0.0) -> Corpus:
    texts = _collect(max_chars)
    texts.sort(key=lambda t: _order_key(t.text))
    if max_chars is not None:
        texts = _cap(texts, max_chars)
    # Whole docstrings are split, before texts and pairs are derived: a docstring reaches one
    # side only, as a text and as a pair.
    held = [held_out_document(item.text, eval_fraction) for item in texts]
    pairs = [docstring_pair(item.text) if item.docstring else None for item in texts]
    with_pairs = sum(pair is not None for pair, h in zip(pairs, held, strict=True) if not h)
    share = validation_share(with_pairs or held.count(False), val_fraction)
    sides: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], []), "eval": ([], [])}
    for item, pair, h in zip(texts, pairs, held, strict=True):
        side = "eval" if h else "val" if validation_document(item.text, share) else "train"
        sides[side][0].append(item.text)
        if pair is not None:
            sides[side][1].append(pair)
    (train_texts, train_pairs), (val_texts, val_pairs) = sides["train"], sides["val"]
    eval_texts, eval_pairs = sides["eval"]
    # Many docstrings share a summary; an eval pair whose summary is also a training target
    # would measure recall, not summarization.
    train_summaries = {summary for _, summary in train_pairs}
    eval_pairs = [p for p in eval_pairs if p[1] not in train_summaries]
    val_pairs = [p for p in val_pairs if p[1] not in train_summaries]
    # A training docstring's description can be, word for word, a held-out (or validation)
    # docstring.
    aside = set(eval_texts) | set(val_texts)
    train_pairs = [p for p in train_pairs if p[0] not in aside and p[1] not in aside]
    return Corpus(train_texts, eval_texts, train_pairs, eval_pairs, val_texts, val_pairs)


def _cap(texts: list[_Text], max_chars: int) -> list[_Text]:
    kept, total = [], 0
    for item in texts:
        if total + len(item.text) <= max_chars:
            kept.append(item)
            total += len(item.text)
    return kept


def _collect(max_chars: int | None) -> list[_Text]:
    """Unique texts: all topics, then docstrings from files in hash order until ``max_chars``
    characters are gathered (or all files are read)."""
    seen: set[str] = set()
    texts: list[_Text] = []
    total = 0

    def add(text: str, docstring: bool) -> None:
        nonlocal total
        if text not in seen:
            seen.add(text)
            texts.append(_Text(text, docstring))
            total += len(text)

    for text in _topics():
        add(text, docstring=False)
    files = sorted(_source_files(), key=lambda f: _order_key(f[0]))
    parallel = max_chars is None or max_chars >= _PARALLEL_MIN_CHARS
    extracted = _extract_all([path for _, path in files], parallel)
    try:
        for docstrings in extracted:
            for text in docstrings:
                add(text, docstring=True)
            if max_chars is not None and total >= max_chars:
                break
    finally:
        extracted.close()  # stops the workers now rather than whenever it is collected
    return texts


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [t for name in sorted(topics) if _long_enough(t := topics[name].strip())]


def _source_files() -> Iterator[tuple[str, str]]:
    """(stable label, path) of every Python source to read."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    yield from _walk(stdlib, "stdlib", (".py",))
    for module, _ in PACKAGES:
        for root in _package_roots(module):
            if root.is_file():
                yield f"{module}/{root.name}", str(root)
            else:
                yield from _walk(root, module, (".py", ".pyi"))


def _package_roots(module: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    if spec.origin and spec.origin.endswith(".py"):
        return [Path(spec.origin)]
    return []


def _walk(root: Path, label: str, suffixes: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        relative = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if name.endswith(suffixes):
                yield f"{label}/{(relative / name).as_posix()}", os.path.join(dirpath, name)


def _extract_all(paths: list[str], parallel: bool) -> Generator[list[str], None, None]:
    """Docstrings of each file, in the order of ``paths``."""
    workers = worker_count() if parallel else 1
    if workers > 1:
        try:
            context = mp_context()
            pool = context.Pool(workers, initializer=gc.disable)
        except (OSError, ValueError, ImportError) as e:
            log.debug("no process pool (%s); reading sources in this process", e)
        else:
            # Leaving the block terminates the workers, also when the caller stops early.
            with pool:
                yield from pool.imap(file_docstrings, paths, chunksize=16)
            return
    with _gc_paused():
        for path in paths:
            yield file_docstrings(path)


@contextmanager
def _gc_paused() -> Iterator[None]:
    # Syntax trees are acyclic and freed by reference counting; the cyclic collector only
    # rescans them over and over (about a quarter of the parse time).
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def file_docstrings(path: str) -> list[str]:
    """Cleaned docstrings of at least MIN_TEXT_WORDS words of the module, classes and
    functions (nested ones too) in one source file; empty when it cannot be read or parsed."""
    try:
        if os.path.getsize(path) > _MAX_FILE_BYTES:
            return []
        with open(path, "rb") as f:
            source = f.read()
    except OSError:
        return []
    if b'"""' not in source and b"'''" not in source:
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    found: list[str] = []
    _docstrings([tree], found)
    return found


def _docstrings(nodes: Iterable[ast.AST], found: list[str]) -> None:
    # Only statements can hold definitions; skipping expressions makes this much cheaper
    # than ast.walk.
    for node in nodes:
        if isinstance(node, (ast.Module, *_DEFS)):
            text = ast.get_docstring(node, clean=True)
            if text and _long_enough(text := text.strip()) and _encodable(text):
                found.append(text)
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                _docstrings((c for c in children if isinstance(c, _STATEMENTS)), found)


# ---------------------------------------------------------------------------- pairs


def docstring_pair(docstring: str) -> tuple[str, str] | None:
    """(document, summary) from a PEP 257 docstring, or None when it does not make a good
    pair: the summary is the first paragraph joined to one line (SUMMARY_WORDS words, prose,
    not a section header or signature), the document the rest (at least MIN_BODY_WORDS words
    of prose, at most MAX_CODE_LINE_SHARE of its lines code)."""
    parts = _PARAGRAPH_BREAK.split(docstring, maxsplit=1)
    if len(parts) != 2:
        return None
    summary, body = " ".join(parts[0].split()), parts[1].strip()
    if not _good_summary(summary):
        return None
    prose_words, code_lines, lines = _prose_and_code(body)
    if prose_words < MIN_BODY_WORDS or code_lines > MAX_CODE_LINE_SHARE * lines:
        return None
    return body, summary


def _good_summary(summary: str) -> bool:
    words = summary.split()
    if not SUMMARY_WORDS[0] <= len(words) <= SUMMARY_WORDS[1]:
        return False
    if summary.endswith(":") or ">>>" in summary or "::" in summary:
        return False
    if summary.startswith("..") or any(_UNDERLINE.fullmatch(w) for w in words):
        return False  # a reST directive or section title ("Examples\n--------")
    if _SIGNATURE.match(summary) or _ARGUMENT.match(summary):
        return False
    wordy = sum(1 for w in words if any(c.isalpha() for c in w))
    return wordy >= 0.8 * len(words)


def _prose_and_code(body: str) -> tuple[int, int, int]:
    """(words outside code, code lines, non-blank lines). Code: fenced blocks, doctest
    examples with their output, and reST literal blocks (indented after a "::" line)."""
    prose = code = lines = 0
    fenced = doctest = False
    literal_indent: int | None = None  # indentation of the line that opened a literal block
    for line in body.splitlines():
        stripped = line.strip()
        if not stripped:
            doctest = False
            continue
        lines += 1
        indent = len(line) - len(line.lstrip())
        if literal_indent is not None and indent <= literal_indent:
            literal_indent = None
        if stripped.startswith("```"):
            fenced = not fenced
            code += 1
        elif stripped.startswith(">>>"):
            doctest = True
            code += 1
        elif fenced or doctest or literal_indent is not None or stripped.startswith("$ "):
            code += 1
        else:
            prose += len(stripped.split())
            if stripped.endswith("::"):
                literal_indent = indent
    return prose, code, lines


# ---------------------------------------------------------------------------- key


def corpus_key(eval_fraction: float, max_chars: int | None, val_fraction: float = 0.0) -> str:
    """A hash of everything the corpus depends on: its extraction's version, the Python and
    package versions it reads, and the options."""
    versions = {}
    for module, distribution in PACKAGES:
        if not _package_roots(module):
            versions[module] = None
            continue
        try:
            versions[module] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[module] = "unknown"
    blob = json.dumps(
        {
            "corpus_version": CORPUS_VERSION,
            "python": sys.version,
            "packages": versions,
            "eval_fraction": eval_fraction,
            "max_chars": max_chars,
            "val_fraction": val_fraction,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------- helpers


def _order_key(text: str) -> bytes:
    return hashlib.sha256(_utf8(text)).digest()


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _encodable(text: str) -> bool:
    # Escapes in a docstring can make lone surrogates, which tokenizers and JSON writers reject.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _long_enough(text: str) -> bool:
    return len(text.split()) >= MIN_TEXT_WORDS
