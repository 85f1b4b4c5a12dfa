"""Raw sources -> Arrow tables on disk: the documents and document/summary pairs a run trains
and evaluates on.

``load_raw`` reads the user's sources (the embedded corpus when the user names none) once,
streaming, into memory-mapped Arrow tables (:mod:`data.store`), and holds out a stable-hash share
of them when no evaluation source is given. Of the training documents and pairs, a small share
is set aside as the validation split (:func:`data.split.validation_document`), which picks
the weights a run keeps; it is never the held-out split. Every table folder is cached under the cache's
``prepared`` folder (:mod:`data.cache`), keyed by what identifies its input (the files' paths,
sizes and modification times, the reading settings), never by hashing the text; the embedded
corpus by the installed packages it is drawn from (:func:`data.corpus.corpus_key`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.cache import PREP_VERSION, CacheDir, mp_context, prepared_root
from data.config import DataConfig
from data.corpus import DEFAULT_MAX_CHARS, build_default_corpus, corpus_key
from data.sources import Reading, iter_pairs, iter_texts
from data.split import held_out_document, validation_document, validation_share
from data.store import PairTable, TableWriter, TextTable, digest
from data.tasks import check_eval_tasks, pair_tasks
from model.tokenizer import DEFAULT_TASK


@dataclass
class RawData:
    """Documents and pairs: memory-mapped tables (:mod:`data.store`) or plain lists."""

    train_texts: TextTable | list[str]
    eval_texts: TextTable | list[str]
    train_pairs: PairTable | list[tuple[str, str]]
    eval_pairs: PairTable | list[tuple[str, str]]
    description: str
    # Set aside from the training data to pick the kept weights; never the held-out split.
    val_texts: TextTable | list[str] = field(default_factory=list)
    val_pairs: PairTable | list[tuple[str, str]] = field(default_factory=list)
    # The named text-to-text tasks (``--train-pairs title=...``), name -> (train, eval, val)
    # pairs; ``summarize``'s are the pairs above.
    tasks: dict[str, tuple] = field(default_factory=dict)

    def has(self, objective: str) -> bool:
        if objective == DEFAULT_TASK:
            return bool(self.train_pairs)
        if objective in self.tasks:
            return bool(self.tasks[objective][0])
        return bool(self.train_texts)

    def pairs(self, task: str, split: str):
        """A task's pairs of one split ("train", "eval" or "val")."""
        if task == DEFAULT_TASK:
            return getattr(self, f"{split}_pairs")
        return self.tasks[task][("train", "eval", "val").index(split)]

    @property
    def task_names(self) -> list[str]:
        """``summarize`` and the named tasks (those with pairs of some split)."""
        return [DEFAULT_TASK, *self.tasks]


# ---------------------------------------------------------------------------- sources


def read_texts(paths: list[str], cfg: DataConfig) -> list[str]:
    """The documents of every text source, read with the configured columns and encoding."""
    return [doc for p in paths for doc in iter_source("texts", p, cfg)]


def read_pairs(paths: list[str], cfg: DataConfig) -> list[tuple[str, str]]:
    """The (document, summary) pairs of every pair source."""
    return [pair for p in paths for pair in iter_source("pairs", p, cfg)]


def iter_source(kind: str, source: str, cfg: DataConfig, *, streaming: bool = False):
    """One source's documents (``kind`` "texts") or (document, summary) pairs ("pairs"), read
    with the configured columns, split and encoding (``streaming``: a hub dataset is streamed
    rather than prepared)."""
    reading = Reading(cfg.hf_config, cfg.hf_split, cfg.encoding)
    if kind == "texts":
        split, column = cfg.text_split, cfg.text_column
        return iter_texts(
            source, text_column=column, split=split, reading=reading, streaming=streaming
        )
    columns = dict(document_column=cfg.document_column, summary_column=cfg.summary_column)
    return iter_pairs(source, **columns, reading=reading)


def source_identity(source: str) -> list:
    """What identifies a source without reading it: each file's path, size and modification
    time (every file of a folder); a hub dataset by its name."""
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return ["hub", source]
    out = []
    for f in files:
        st = f.stat()
        out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return out


class _Warnings(logging.Handler):
    """The data.sources warnings of a preparation, kept so a cache hit repeats them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _recording_warnings():
    handler = _Warnings()
    logger = logging.getLogger("data.sources")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _replay(meta: dict) -> None:
    for message in meta.get("warnings", []):
        logging.getLogger("data.sources").warning("%s", message)


def prepare_split(
    kind: str, train_sources: list[str], eval_sources: list[str], cfg: DataConfig
) -> tuple:
    """Read ``kind`` ("texts" or "pairs") into train/eval/val Arrow tables, cached by the
    sources' identity and the reading settings. Without eval sources, the held-out share is
    chosen document by document (by :func:`~data.split.held_out_document`) while reading; the
    validation split is then carved from the training rows (:func:`carve_validation`)."""
    if kind == "texts":
        columns, settings = ("text",), (cfg.text_column, cfg.text_split)
        table_cls = TextTable
    else:
        columns, settings = ("document", "summary"), (cfg.document_column, cfg.summary_column)
        table_cls = PairTable
    fraction = None if eval_sources else cfg.eval_fraction
    key = digest(
        kind,
        PREP_VERSION,
        settings,
        cfg.hf_config,
        cfg.hf_split,
        cfg.encoding,
        fraction,
        cfg.val_fraction,
        [source_identity(s) for s in train_sources],
        [source_identity(s) for s in eval_sources],
    )
    cache = CacheDir(prepared_root(), f"{kind}-{key}")

    def fill() -> None:
        meta: dict = {}
        with _recording_warnings() as warnings, cache.build(meta) as tmp:
            writers = {
                split: TableWriter(tmp / f"{split}.arrow", columns) for split in ("train", "eval")
            }
            chars = {"train": 0, "eval": 0}

            def add(split: str, row) -> None:
                row = (row,) if kind == "texts" else row
                writers[split].add(*row)
                chars[split] += len(row[0])

            for source in train_sources:
                for row in iter_source(kind, source, cfg):
                    first = row if kind == "texts" else row[0]
                    held = fraction is not None and held_out_document(first, fraction)
                    add("eval" if held else "train", row)
            for source in eval_sources:
                for row in iter_source(kind, source, cfg):
                    add("eval", row)
            for w in writers.values():
                w.close()
            carve_validation(tmp, table_cls, cfg.val_fraction, chars)
            meta.update(chars=chars, warnings=warnings)

    meta = cache.obtain(fill)
    if not cache.built:
        _replay(meta)
    return tuple(
        table_cls(cache.path / f"{split}.arrow", digest(key, split), meta["chars"][split])
        for split in ("train", "eval", "val")
    )


def carve_validation(folder: Path, table_cls: type, fraction: float, chars: dict) -> None:
    """Split ``folder``/train.arrow into training rows and the validation split, val.arrow:
    :func:`~data.split.validation_share` of the rows, drawn by their document (near-duplicates
    together). A validation pair whose summary is also a training summary goes back to
    training: it would measure recall. ``chars`` gets each side's characters."""
    whole = table_cls(folder / "train.arrow", "")
    share = validation_share(len(whole), fraction)
    pairs = table_cls is PairTable
    first = (lambda row: row[0]) if pairs else (lambda row: row)
    aside = np.fromiter((validation_document(first(r), share) for r in whole), bool, len(whole))
    if pairs and aside.any():
        summaries = {s for (_, s), a in zip(whole, aside, strict=True) if a}
        shared = {s for (_, s), a in zip(whole, aside, strict=True) if not a and s in summaries}
        aside &= ~np.fromiter((s in shared for _, s in whole), bool, len(whole))
    columns = table_cls.columns
    chars["val"] = 0
    if not aside.any():
        TableWriter(folder / "val.arrow", columns).close()
        return
    writers = [TableWriter(folder / name, columns) for name in ("rest.arrow", "val.arrow")]
    chars["train"] = 0
    for row, a in zip(whole, aside, strict=True):
        row = row if pairs else (row,)
        writers[int(a)].add(*row)
        chars["val" if a else "train"] += len(row[0])
    for w in writers:
        w.close()
    os.replace(folder / "rest.arrow", folder / "train.arrow")


def _embedded_corpus(cfg: DataConfig) -> RawData:
    """The embedded corpus as memory-mapped tables: built once, then read from the cache."""
    kwargs: dict = {"val_fraction": cfg.val_fraction}
    if cfg.corpus_max_chars is not None:
        kwargs["max_chars"] = cfg.corpus_max_chars
    max_chars = kwargs.get("max_chars", DEFAULT_MAX_CHARS)
    key = digest("corpus", PREP_VERSION, corpus_key(cfg.eval_fraction, max_chars, cfg.val_fraction))
    cache = CacheDir(prepared_root(), f"corpus-{key}")
    names = _EMBEDDED_TABLES

    def fill() -> None:
        # In a child process: the build holds every document as a Python string (1.3 GB at its
        # peak for the default 20M characters), and a process seldom hands freed memory back
        # to the system, so the trainer would carry that peak for its whole run. The child
        # leaves only the tables; its errors are raised here.
        with ProcessPoolExecutor(1, mp_context=mp_context()) as pool:
            pool.submit(_build_embedded, cache, cfg.eval_fraction, kwargs).result()

    meta = cache.obtain(fill)
    tables = {
        name: (PairTable if name.endswith("pairs") else TextTable)(
            cache.path / f"{name}.arrow", digest(key, name), meta["chars"][name]
        )
        for name in names
    }
    return RawData(**tables, description=f"embedded corpus: {meta['describe']}")


_EMBEDDED_TABLES = (
    "train_texts", "eval_texts", "train_pairs", "eval_pairs", "val_texts", "val_pairs",
)  # fmt: skip


def _build_embedded(cache: CacheDir, eval_fraction: float, kwargs: dict) -> None:
    """The embedded corpus (:func:`data.corpus.build_default_corpus`) written as tables."""
    corpus = build_default_corpus(eval_fraction=eval_fraction, **kwargs)
    meta = {"describe": corpus.describe(), "chars": {}}
    with cache.build(meta) as tmp:
        for name in _EMBEDDED_TABLES:
            pairs = name.endswith("pairs")
            w = TableWriter(tmp / f"{name}.arrow", ("document", "summary") if pairs else ("text",))
            for row in getattr(corpus, name):
                w.add(*(row if pairs else (row,)))
            w.close()
            meta["chars"][name] = sum(len(r[0] if pairs else r) for r in getattr(corpus, name))


def load_raw(cfg: DataConfig) -> RawData:
    if not cfg.train_text and not cfg.train_pairs:
        return _embedded_corpus(cfg)
    tasks = pair_tasks(cfg.train_pairs)
    evals = check_eval_tasks(tasks, cfg.eval_pairs)
    train_texts, eval_texts, val_texts = prepare_split("texts", cfg.train_text, cfg.eval_text, cfg)
    train_pairs, eval_pairs, val_pairs = prepare_split(
        "pairs", tasks.get(DEFAULT_TASK, []), evals.get(DEFAULT_TASK, []), cfg
    )
    named = {
        name: prepare_split("pairs", sources, evals.get(name, []), cfg)
        for name, sources in tasks.items()
        if name != DEFAULT_TASK
    }
    names = ", ".join(cfg.train_text + cfg.train_pairs)
    desc = (
        f"{names}: {len(train_texts)} texts ({train_texts.num_chars:,} chars), "
        f"{len(train_pairs)} pairs; validation {len(val_texts)} texts, {len(val_pairs)} pairs; "
        f"held out {len(eval_texts)} texts, {len(eval_pairs)} pairs"
    )
    for name, (train, held, val) in named.items():
        desc += f"; task {name}: {len(train)} pairs, validation {len(val)}, held out {len(held)}"
    return RawData(
        train_texts, eval_texts, train_pairs, eval_pairs, desc, val_texts=val_texts,
        val_pairs=val_pairs, tasks=named,
    )  # fmt: skip
