"""Arrow tables -> flat token arrays on disk -> one stream per objective.

``build_streams`` tokenizes the tables :func:`data.raw.load_raw` prepared, shard by shard, into
flat token files and builds the objective streams the mixture loader draws from. Every token
folder is cached under the cache's ``prepared`` folder (:mod:`data.cache`), keyed by its
table's key, the tokenizer's JSON and the objective's settings, never by hashing the text, and
written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path

import numpy as np

from data.batching import MaskedLMStream, Seq2SeqStream
from data.cache import PREP_VERSION, CacheDir, mp_context, prepared_root, worker_count
from data.config import DataConfig
from data.objectives import OBJECTIVES, is_objective
from data.objectives.gap_summary import gap_sentences
from data.raw import RawData
from data.store import (
    PairTable,
    Ragged,
    TextTable,
    as_docs,
    concat_files,
    digest,
    open_array,
    write_array,
)
from model.files import atomic_path
from model.tokenizer import DEFAULT_TASK, TokenizerError, special_ids, task_ids

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
    # In-memory lists (small evaluation inputs) would be copied to every worker.
    if not isinstance(docs, TextTable | PairTable):
        return 1
    if len(docs) < PARALLEL_MIN_DOCS or len(_shards(docs)) < 2:
        return 1
    return worker_count()


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
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
    cache = CacheDir(prepared_root(), f"{name}-{digest('tokens', PREP_VERSION, docs.key, tok_key)}")

    def fill() -> None:
        cache.partial.mkdir(parents=True, exist_ok=True)
        parts = []
        with cache.build() as tmp:
            for i, shard in enumerate(_shards(docs)):
                part = cache.partial / f"shard-{i:05d}.int32"
                if not part.exists():
                    pieces = []
                    for b in shard:
                        ids = encode_texts(tokenizer, docs.read_batch(b))
                        pieces.append(_ragged([x + [sep] for x in ids])[0])
                    write_array(part, np.concatenate(pieces))
                parts.append(part)
            concat_files(parts, tmp / "tokens.int32")

    cache.obtain(fill)
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

    def fill() -> None:
        cache.partial.mkdir(parents=True, exist_ok=True)
        parts = [cache.partial / f"shard-{i:05d}.npz" for i in range(len(tasks))]
        todo = [i for i, p in enumerate(parts) if not p.exists()]
        workers = _workers(docs)
        with cache.build() as tmp:
            for i, (src, tgt) in zip(
                todo, _run_tasks(task, [tasks[i] for i in todo], workers), strict=True
            ):
                s_flat, s_len = _ragged(encode_texts(tokenizer, src))
                t_flat, t_len = _ragged(encode_texts(tokenizer, tgt))
                with atomic_path(parts[i], unique=True) as tmp_part, open(tmp_part, "wb") as f:
                    np.savez(f, s_flat=s_flat, s_len=s_len, t_flat=t_flat, t_len=t_len)
            _join_pairs(parts, tmp)

    cache.obtain(fill)
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
    with mp_context().Pool(min(workers, len(tasks))) as pool:
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
    cache = CacheDir(prepared_root(), f"{name}-{digest('pairs', PREP_VERSION, docs.key, tok_key)}")
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
    cache = CacheDir(prepared_root(), f"{name}-{key}")
    tasks = [(docs, shard, cfg.gap_ratio, max_chars, mask_token) for shard in _shards(docs)]
    return _tokenized_pairs(cache, docs, _gap_shard, tasks, tokenizer)


@dataclass
class Streams:
    train: dict
    eval: dict
    val: dict = field(default_factory=dict)
    """The validation split's streams (:class:`data.raw.RawData`), which pick the kept weights."""

    def describe(self) -> str:
        parts = []
        for name, s in self.train.items():
            held, val = len(self.eval.get(name, [])), len(self.val.get(name, []))
            parts.append(
                f"{name}: {len(s):,} train / {val:,} validation / {held:,} held-out examples "
                f"({s.num_tokens:,} tokens{', packed' if getattr(s, 'pack', False) else ''})"
            )
        return "; ".join(parts)


def build_streams(
    raw: RawData,
    tokenizer,
    cfg: DataConfig,
    objectives: list[str],
    seq_len: int,
    batch_size: int = 32,
) -> Streams:
    """Tokenize what the chosen objectives need and wrap each in its stream. ``batch_size``:
    the training batches' (whether packing pays, ``--pack-pairs auto``)."""
    ids = special_ids(tokenizer)
    tok_key = digest(tokenizer.backend_tokenizer.to_str())
    masking = cfg.masking()
    train, evals, vals = {}, {}, {}
    for name in objectives:
        if not is_objective(name):
            raise ValueError(
                f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)} or a task "
                "name of --train-pairs"
            )
    if "masked_lm" in objectives:
        flat = tokenize_texts(raw.train_texts, tokenizer, "text-train", tok_key)
        train["masked_lm"] = MaskedLMStream.from_tokenizer(flat, seq_len, tokenizer, masking)
        for split, texts, out in (("eval", raw.eval_texts, evals), ("val", raw.val_texts, vals)):
            flat = tokenize_texts(texts, tokenizer, f"text-{split}", tok_key)
            out["masked_lm"] = train["masked_lm"].over(flat)
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
            ("val", raw.val_texts, vals),
        ):
            src, tgt = gap_pairs(texts, cfg, tokenizer, f"gaps-{split}", tok_key)
            masker = source_masker if split == "train" else None
            out["gap_summary"] = Seq2SeqStream(
                "gap_summary", src, tgt, ids, **lengths, source_masker=masker
            )
    tokens = task_ids(tokenizer)
    for task in [n for n in objectives if n not in OBJECTIVES]:
        if task not in tokens:
            raise TokenizerError(
                f"the tokenizer has no token for task {task} (expected {task!r} among its task "
                f"tokens: {', '.join(tokens) or 'none'})"
            )
    # summarize first (as it always was), then each named task: the same objective, with the
    # task's token in front of its sources.
    for task in [n for n in objectives if n == DEFAULT_TASK or n not in OBJECTIVES]:
        task_id = None if task == DEFAULT_TASK else tokens[task]
        prefix = "pairs" if task == DEFAULT_TASK else f"pairs-{task}"
        for split, out in (("train", train), ("eval", evals), ("val", vals)):
            pairs = raw.pairs(task, split)
            src, tgt = tokenize_pairs(pairs, tokenizer, f"{prefix}-{split}", tok_key)
            masker = source_masker if split == "train" else None
            out[task] = Seq2SeqStream(
                task, src, tgt, ids, **lengths, source_masker=masker, task_id=task_id
            )
    for stream in train.values():
        if isinstance(stream, Seq2SeqStream):
            stream.pack = packs(stream, cfg.pack_pairs, batch_size)
    return Streams(train, evals, vals)


# --pack-pairs auto packs a stream whose batches packing shortens by this share or more. Measured
# (docs/performance.md, "Packed summarization batches"): the Debian pairs' batches 36% shorter,
# 1.22x the real tokens a second; the embedded corpus's 1% shorter, 0.92x.
PACK_WHEN_SAVED = 0.15


def packs(stream: Seq2SeqStream, setting: str, batch_size: int) -> bool:
    """Whether ``stream``'s training batches are packed under ``--pack-pairs setting``."""
    if setting == "auto":
        return stream.packing_saves(batch_size) >= PACK_WHEN_SAVED  # 0 for no examples
    return setting == "on"
