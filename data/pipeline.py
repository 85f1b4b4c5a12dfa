"""Raw sources -> Arrow tables on disk -> flat token arrays on disk -> one stream per objective.

``load_raw`` reads documents and document/summary pairs (the embedded corpus when the user
names no source) once, streaming, into memory-mapped Arrow tables; ``build_streams`` tokenizes
them shard by shard into flat token files and builds the objective streams the mixture loader
draws from. Every prepared folder is cached under ``$MINITURING_CACHE/prepared``, keyed by what
identifies its input (the files' paths, sizes and modification times, the tokenizer's JSON,
the objective's settings), never by hashing the text, and written atomically (see
:mod:`data.store`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path

import numpy as np
from datasets.utils.logging import disable_progress_bar

from data.batching import PAD_MULTIPLE, MaskedLMStream, Seq2SeqStream
from data.objectives import OBJECTIVES
from data.objectives.gap_summary import gap_sentences
from data.objectives.masked_lm import MaskingConfig
from data.store import (
    CacheDir,
    PairTable,
    Ragged,
    TableWriter,
    TextTable,
    as_docs,
    concat_files,
    digest,
    open_array,
    write_array,
)
from data.tokenizer import special_ids

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    train_text: list[str] = field(default_factory=list)
    """Text sources for the self-supervised objectives: .txt files or folders, jsonl/csv/parquet
    files, save_to_disk folders or hub dataset names. Empty: the embedded corpus."""
    train_pairs: list[str] = field(default_factory=list)
    """Document/summary pair sources (jsonl/csv/parquet, folders, datasets). Empty: the
    embedded corpus's docstring pairs when no text source is given either."""
    eval_text: list[str] = field(default_factory=list)
    """Held-out text sources. Empty: a stable-hash share of the training text."""
    eval_pairs: list[str] = field(default_factory=list)
    """Held-out pair sources. Empty: a stable-hash share of the training pairs."""
    text_column: str = "text"
    document_column: str = "document"
    summary_column: str = "summary"
    text_split: str = "line"
    """How plain text files split into documents: line, block (blank lines) or file."""
    hf_config: str | None = None
    """Configuration name of a hub dataset source."""
    hf_split: str = "train"
    """Split of a hub dataset or DatasetDict folder to read."""
    encoding: str = "utf-8"
    """Text encoding of plain-text, jsonl and csv sources."""
    eval_fraction: float = 0.02
    """Share of documents held out (by stable hash) when no eval source is given."""
    tokenizer: str | None = None
    """A tokenizer.json (or folder holding one) to use instead of training one."""
    tokenizer_kind: str = "bpe"
    """Tokenizer to train: bpe (byte-level), wordpiece or unigram."""
    vocab_size: int = 8192
    source_len: int = 256
    """Summarization source length limit in tokens (longer sources are truncated)."""
    target_len: int = 48
    """Summarization target length limit in tokens (longer targets are truncated)."""
    gap_ratio: float = 0.3
    """Share of sentences hidden by gap-sentence generation."""
    mask_rate: float = 0.15
    source_mask_rate: float = 0.15
    """Share of each training source's words also masked and predicted in sequence-to-sequence
    steps (masked-LM signal in every summarization step, as in UniLM); 0: sources stay whole."""
    whole_word: bool = True
    span_masking: bool = False
    corpus_max_chars: int | None = None
    """Cap on the embedded corpus's size in characters (None: the corpus's default)."""
    pad_multiple: int = PAD_MULTIPLE
    """Pad sequence-to-sequence batches to a multiple of this many positions (1: to the longest
    example). Speed and memory only: CPU matrix kernels are prepared and kept per shape."""
    streaming: bool = False
    """Read --train-text as a stream (a datasets IterableDataset, split across processes),
    tokenized and packed into masked-LM blocks on the fly, for corpora larger than disk; exact
    resume. masked_lm only. Held out: --eval-text, else the first 256 documents of the stream."""

    def masking(self) -> MaskingConfig:
        """The masked-LM masking these options ask for, checked."""
        masking = MaskingConfig(
            rate=self.mask_rate, whole_word=self.whole_word, span=self.span_masking
        )
        masking.validate()
        return masking


@dataclass
class RawData:
    """Documents and pairs: memory-mapped tables (:mod:`data.store`) or plain lists."""

    train_texts: TextTable | list[str]
    eval_texts: TextTable | list[str]
    train_pairs: PairTable | list[tuple[str, str]]
    eval_pairs: PairTable | list[tuple[str, str]]
    description: str

    def has(self, objective: str) -> bool:
        if objective == "summarize":
            return bool(self.train_pairs)
        return bool(self.train_texts)


def cache_root() -> Path:
    return Path(os.environ.get("MINITURING_CACHE", Path.home() / ".cache" / "minituring"))


def _prepared() -> Path:
    return cache_root() / "prepared"


# ---------------------------------------------------------------------------- raw data

# Bumped whenever what a prepared folder holds changes for the same inputs.
PREP_VERSION = 1


def read_texts(paths: list[str], cfg: DataConfig) -> list[str]:
    """The documents of every text source, read with the configured columns and encoding."""
    return [doc for p in paths for doc in iter_source_texts(p, cfg)]


def read_pairs(paths: list[str], cfg: DataConfig) -> list[tuple[str, str]]:
    """The (document, summary) pairs of every pair source."""
    return [pair for p in paths for pair in _iter_pairs(p, cfg)]


def iter_source_texts(source: str, cfg: DataConfig, *, streaming: bool = False):
    """One text source's documents, read with the configured columns, split and encoding
    (``streaming``: a hub dataset is streamed rather than prepared)."""
    from data import sources

    return sources.iter_texts(
        source,
        text_column=cfg.text_column,
        split=cfg.text_split,
        hf_config=cfg.hf_config,
        hf_split=cfg.hf_split,
        encoding=cfg.encoding,
        streaming=streaming,
    )


def _iter_pairs(source: str, cfg: DataConfig):
    from data import sources

    return sources.iter_pairs(
        source,
        document_column=cfg.document_column,
        summary_column=cfg.summary_column,
        hf_config=cfg.hf_config,
        hf_split=cfg.hf_split,
        encoding=cfg.encoding,
    )


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


def _prepare_split(
    kind: str, train_sources: list[str], eval_sources: list[str], cfg: DataConfig
) -> tuple:
    """Read ``kind`` ("texts" or "pairs") into train/eval Arrow tables, cached by the sources'
    identity and the reading settings. Without eval sources, the held-out share is chosen
    document by document (by :func:`~data.corpus.held_out_document`) while reading."""
    from data.corpus import held_out_document

    if kind == "texts":
        columns, settings = ("text",), (cfg.text_column, cfg.text_split)
        table_cls, read = TextTable, iter_source_texts
    else:
        columns, settings = ("document", "summary"), (cfg.document_column, cfg.summary_column)
        table_cls, read = PairTable, _iter_pairs
    fraction = None if eval_sources else cfg.eval_fraction
    key = digest(
        kind,
        PREP_VERSION,
        settings,
        cfg.hf_config,
        cfg.hf_split,
        cfg.encoding,
        fraction,
        [source_identity(s) for s in train_sources],
        [source_identity(s) for s in eval_sources],
    )
    cache = CacheDir(_prepared(), f"{kind}-{key}")
    if cache.ready():
        meta = cache.meta()
        _replay(meta)
    else:
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
                for row in read(source, cfg):
                    first = row if kind == "texts" else row[0]
                    held = fraction is not None and held_out_document(first, fraction)
                    add("eval" if held else "train", row)
            for source in eval_sources:
                for row in read(source, cfg):
                    add("eval", row)
            for w in writers.values():
                w.close()
            meta.update(chars=chars, warnings=warnings)
    return tuple(
        table_cls(cache.path / f"{split}.arrow", digest(key, split), meta["chars"][split])
        for split in ("train", "eval")
    )


def _embedded_corpus(cfg: DataConfig) -> RawData:
    """The embedded corpus as memory-mapped tables, converted once from its own cache."""
    from data.corpus import DEFAULT_MAX_CHARS, _cache_key, _mp_context

    kwargs = {} if cfg.corpus_max_chars is None else {"max_chars": cfg.corpus_max_chars}
    max_chars = kwargs.get("max_chars", DEFAULT_MAX_CHARS)
    key = digest("corpus", PREP_VERSION, _cache_key(cfg.eval_fraction, max_chars))
    cache = CacheDir(_prepared(), f"corpus-{key}")
    names = _EMBEDDED_TABLES
    if not cache.ready():
        # In a child process: the build holds every document as a Python string (1.3 GB at its
        # peak for the default 20M characters), and a process seldom hands freed memory back
        # to the system, so the trainer would carry that peak for its whole run. The child
        # leaves only the tables; its errors are raised here.
        with ProcessPoolExecutor(1, mp_context=_mp_context()) as pool:
            pool.submit(_build_embedded, cache, cfg.eval_fraction, kwargs).result()
    meta = cache.meta()
    tables = [
        (PairTable if name.endswith("pairs") else TextTable)(
            cache.path / f"{name}.arrow", digest(key, name), meta["chars"][name]
        )
        for name in names
    ]
    return RawData(*tables, f"embedded corpus: {meta['describe']}")


_EMBEDDED_TABLES = ("train_texts", "eval_texts", "train_pairs", "eval_pairs")


def _build_embedded(cache: CacheDir, eval_fraction: float, kwargs: dict) -> None:
    """The embedded corpus (:func:`data.corpus.build_default_corpus`) written as tables."""
    from data.corpus import build_default_corpus

    corpus = build_default_corpus(cache_dir=cache_root(), eval_fraction=eval_fraction, **kwargs)
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
    train_texts, eval_texts = _prepare_split("texts", cfg.train_text, cfg.eval_text, cfg)
    train_pairs, eval_pairs = _prepare_split("pairs", cfg.train_pairs, cfg.eval_pairs, cfg)
    names = ", ".join(cfg.train_text + cfg.train_pairs)
    desc = (
        f"{names}: {len(train_texts)} texts ({train_texts.num_chars:,} chars), "
        f"{len(train_pairs)} pairs; held out {len(eval_texts)} texts, {len(eval_pairs)} pairs"
    )
    return RawData(train_texts, eval_texts, train_pairs, eval_pairs, desc)


# ---------------------------------------------------------------------------- tokenization

# Record batches (of store.BATCH_ROWS rows) per shard: a shard is the unit cached on its own
# and handed to a worker process.
SHARD_BATCHES = 8
# Below this many documents gap-sentence extraction runs in this process: starting workers
# costs more than it saves.
PARALLEL_MIN_DOCS = 20_000


def _shards(docs) -> list[range]:
    n = docs.num_batches
    return [range(i, min(i + SHARD_BATCHES, n)) for i in range(0, n, SHARD_BATCHES)]


def _workers(docs) -> int:
    from data.corpus import _worker_count

    # In-memory lists (small evaluation inputs) would be copied to every worker.
    if not isinstance(docs, TextTable | PairTable):
        return 1
    if len(docs) < PARALLEL_MIN_DOCS or len(_shards(docs)) < 2:
        return 1
    return _worker_count()


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts``, no special tokens. The Rust tokenizer's ``encode_batch_fast``
    (no character offsets) directly when it neither truncates nor pads: the transformers
    wrapper's per-text Python cost 3.5 of 22 s tokenizing 100 MB, the offsets more."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _ragged(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def tokenize_texts(texts, tokenizer, name: str, tok_key: str) -> np.ndarray:
    """All texts as one flat int32 stream, each document followed by [SEP]; read from the
    cache (:class:`~data.store.FileArray`)."""
    docs = as_docs(texts)
    if not len(docs):
        return np.zeros(0, dtype=np.int32)
    sep = tokenizer.sep_token_id
    cache = CacheDir(_prepared(), f"{name}-{digest('tokens', PREP_VERSION, docs.key, tok_key)}")
    if not cache.ready():
        cache.partial.mkdir(parents=True, exist_ok=True)
        parts = []
        with cache.build() as tmp:
            for i, shard in enumerate(_shards(docs)):
                part = cache.partial / f"shard-{i:05d}.int32"
                if not part.exists():
                    pieces = []
                    for b in shard:
                        ids = _encode(tokenizer, docs.read_batch(b))
                        pieces.append(_ragged([x + [sep] for x in ids])[0])
                    write_array(part, np.concatenate(pieces))
                parts.append(part)
            concat_files(parts, tmp / "tokens.int32")
    return open_array(cache.path / "tokens.int32", np.int32)


def _gap_shard(args) -> tuple[list[str], list[str]]:
    """Gap-sentence (source, target) strings of one shard of documents (a worker's task)."""
    docs, shard, ratio, max_chars, mask_token = args
    src, tgt = [], []
    for b in shard:
        for text in docs.read_batch(b):
            pair = gap_sentences(text, ratio=ratio, max_chars=max_chars, mask_token=mask_token)
            if pair is not None:
                src.append(pair[0])
                tgt.append(pair[1])
    return src, tgt


def _pair_shard(args) -> tuple[list[str], list[str]]:
    docs, shard = args
    rows = [row for b in shard for row in docs.read_batch(b)]
    return [d for d, _ in rows], [s for _, s in rows]


def _tokenized_pairs(cache: CacheDir, docs, task, tasks: list, tokenizer) -> tuple[Ragged, Ragged]:
    """Run ``task`` over every shard not cached yet (in worker processes when there are many
    documents), tokenize each shard's (source, target) strings and cache it, then join the
    shards into flat source/target arrays with offsets."""
    if not cache.ready():
        cache.partial.mkdir(parents=True, exist_ok=True)
        parts = [cache.partial / f"shard-{i:05d}.npz" for i in range(len(tasks))]
        todo = [i for i, p in enumerate(parts) if not p.exists()]
        workers = _workers(docs)
        with cache.build() as tmp:
            for i, (src, tgt) in zip(
                todo, _run_tasks(task, [tasks[i] for i in todo], workers), strict=True
            ):
                s_flat, s_len = _ragged(_encode(tokenizer, src))
                t_flat, t_len = _ragged(_encode(tokenizer, tgt))
                tmp_part = parts[i].with_name(f".{parts[i].name}.tmp-{os.getpid()}.npz")
                np.savez(tmp_part, s_flat=s_flat, s_len=s_len, t_flat=t_flat, t_len=t_len)
                os.replace(tmp_part, parts[i])
            _join_pairs(parts, tmp)
    path = cache.path
    return (
        Ragged(open_array(path / "src.int32", np.int32), open_array(path / "src.off", np.int64)),
        Ragged(open_array(path / "tgt.int32", np.int32), open_array(path / "tgt.off", np.int64)),
    )


def _run_tasks(task, tasks: list, workers: int):
    if workers <= 1 or len(tasks) < 2:
        for t in tasks:
            yield task(t)
        return
    from data.corpus import _mp_context

    with _mp_context().Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(task, tasks)


def _join_pairs(parts: list[Path], out: Path) -> None:
    files = {
        name: open(out / name, "wb") for name in ("src.int32", "src.off", "tgt.int32", "tgt.off")
    }
    ends = {"src": 0, "tgt": 0}
    try:
        for name in ("src.off", "tgt.off"):
            files[name].write(np.zeros(1, dtype=np.int64).tobytes())
        for part in parts:
            with np.load(part) as z:
                for side, prefix in (("src", "s"), ("tgt", "t")):
                    files[f"{side}.int32"].write(z[f"{prefix}_flat"].astype(np.int32).tobytes())
                    offsets = ends[side] + np.cumsum(z[f"{prefix}_len"], dtype=np.int64)
                    files[f"{side}.off"].write(offsets.tobytes())
                    if len(offsets):
                        ends[side] = int(offsets[-1])
    finally:
        for f in files.values():
            f.close()


def tokenize_pairs(pairs, tokenizer, name: str, tok_key: str) -> tuple[Ragged, Ragged]:
    """Document/summary pairs as flat token files with offsets, read from the cache."""
    docs = as_docs(pairs)
    if not len(docs):
        return Ragged.from_list([]), Ragged.from_list([])
    cache = CacheDir(_prepared(), f"{name}-{digest('pairs', PREP_VERSION, docs.key, tok_key)}")
    tasks = [(docs, shard) for shard in _shards(docs)]
    return _tokenized_pairs(cache, docs, _pair_shard, tasks, tokenizer)


def gap_pairs(texts, cfg: DataConfig, tokenizer, name: str, tok_key: str) -> tuple[Ragged, Ragged]:
    """Gap-sentence (source, target) examples of raw text, tokenized, cached shard by shard."""
    docs = as_docs(texts)
    if not len(docs):
        return Ragged.from_list([]), Ragged.from_list([])
    mask_token = tokenizer.sentence_mask_token
    # Roughly four characters per token: keep the gaps inside what the model will see.
    max_chars = cfg.source_len * 4
    key = digest("gaps", PREP_VERSION, docs.key, tok_key, cfg.gap_ratio, max_chars, mask_token)
    cache = CacheDir(_prepared(), f"{name}-{key}")
    tasks = [(docs, shard, cfg.gap_ratio, max_chars, mask_token) for shard in _shards(docs)]
    return _tokenized_pairs(cache, docs, _gap_shard, tasks, tokenizer)


@dataclass
class Streams:
    train: dict
    eval: dict

    def describe(self) -> str:
        parts = []
        for name, s in self.train.items():
            held = len(self.eval.get(name, []))
            parts.append(
                f"{name}: {len(s):,} train / {held:,} held-out examples ({s.num_tokens:,} tokens)"
            )
        return "; ".join(parts)


def build_streams(
    raw: RawData,
    tokenizer,
    cfg: DataConfig,
    objectives: list[str],
    seq_len: int,
) -> Streams:
    """Tokenize what the chosen objectives need and wrap each in its stream."""
    disable_progress_bar()
    ids = special_ids(tokenizer)
    tok_key = digest(tokenizer.backend_tokenizer.to_str())
    masking = cfg.masking()
    train, evals = {}, {}
    for name in objectives:
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    if "masked_lm" in objectives:
        flat = tokenize_texts(raw.train_texts, tokenizer, "text-train", tok_key)
        train["masked_lm"] = MaskedLMStream.from_tokenizer(flat, seq_len, tokenizer, masking)
        flat = tokenize_texts(raw.eval_texts, tokenizer, "text-eval", tok_key)
        evals["masked_lm"] = train["masked_lm"].over(flat)
    lengths = dict(
        source_len=cfg.source_len, target_len=cfg.target_len, pad_multiple=cfg.pad_multiple
    )
    source_masker = None
    if cfg.source_mask_rate:
        at_rate = replace(masking, rate=cfg.source_mask_rate)
        at_rate.validate()
        no_text = np.zeros(0, dtype=np.int64)
        source_masker = MaskedLMStream.from_tokenizer(no_text, seq_len, tokenizer, at_rate)
    if "gap_summary" in objectives:
        for split, texts, out in (
            ("train", raw.train_texts, train),
            ("eval", raw.eval_texts, evals),
        ):
            src, tgt = gap_pairs(texts, cfg, tokenizer, f"gaps-{split}", tok_key)
            masker = source_masker if split == "train" else None
            out["gap_summary"] = Seq2SeqStream(
                "gap_summary", src, tgt, ids, **lengths, source_masker=masker
            )
    if "summarize" in objectives:
        for split, pairs, out in (
            ("train", raw.train_pairs, train),
            ("eval", raw.eval_pairs, evals),
        ):
            src, tgt = tokenize_pairs(pairs, tokenizer, f"pairs-{split}", tok_key)
            masker = source_masker if split == "train" else None
            out["summarize"] = Seq2SeqStream(
                "summarize", src, tgt, ids, **lengths, source_masker=masker
            )
    return Streams(train, evals)
