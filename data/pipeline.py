"""Raw sources -> tokenized, cached Arrow datasets -> one stream per objective.

``load_raw`` gathers documents and document/summary pairs (the embedded corpus when the user
names no source); ``build_streams`` tokenizes them through ``datasets.map`` (batched, cached
on disk) and builds the objective streams the mixture loader draws from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from datasets.utils.logging import disable_progress_bar

from data.batching import MaskedLMStream, Seq2SeqStream
from data.objectives import OBJECTIVES
from data.objectives.gap_summary import gap_sentences
from data.objectives.masked_lm import MaskingConfig
from data.tokenizer import special_ids, word_start_table

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
    whole_word: bool = True
    span_masking: bool = False
    corpus_max_chars: int | None = None
    """Cap on the embedded corpus's size in characters (None: the corpus's default)."""
    pad_multiple: int = 16
    """Pad sequence-to-sequence batches to a multiple of this many positions (1: to the longest
    example). Speed only: CPU matrix kernels are prepared per shape."""


@dataclass
class RawData:
    train_texts: list[str]
    eval_texts: list[str]
    train_pairs: list[tuple[str, str]]
    eval_pairs: list[tuple[str, str]]
    description: str

    def has(self, objective: str) -> bool:
        if objective == "summarize":
            return bool(self.train_pairs)
        return bool(self.train_texts)


def cache_root() -> Path:
    return Path(os.environ.get("MINITURING_CACHE", Path.home() / ".cache" / "minituring"))


# ---------------------------------------------------------------------------- raw data


def _split_held_out(items: list, key, fraction: float):
    from data.corpus import is_held_out

    train, held = [], []
    for item in items:
        (held if is_held_out(key(item), fraction) else train).append(item)
    return train, held


def read_texts(paths: list[str], cfg: DataConfig) -> list[str]:
    """The documents of every text source, read with the configured columns and encoding."""
    from data import sources

    out: list[str] = []
    for p in paths:
        out += sources.read_texts(
            p,
            text_column=cfg.text_column,
            split=cfg.text_split,
            hf_config=cfg.hf_config,
            hf_split=cfg.hf_split,
            encoding=cfg.encoding,
        )
    return out


def read_pairs(paths: list[str], cfg: DataConfig) -> list[tuple[str, str]]:
    """The (document, summary) pairs of every pair source."""
    from data import sources

    out: list[tuple[str, str]] = []
    for p in paths:
        out += sources.read_pairs(
            p,
            document_column=cfg.document_column,
            summary_column=cfg.summary_column,
            hf_config=cfg.hf_config,
            hf_split=cfg.hf_split,
            encoding=cfg.encoding,
        )
    return out


def load_raw(cfg: DataConfig) -> RawData:
    if not cfg.train_text and not cfg.train_pairs:
        from data.corpus import build_default_corpus

        kwargs = {} if cfg.corpus_max_chars is None else {"max_chars": cfg.corpus_max_chars}
        corpus = build_default_corpus(
            cache_dir=cache_root(), eval_fraction=cfg.eval_fraction, **kwargs
        )
        return RawData(
            corpus.train_texts,
            corpus.eval_texts,
            corpus.train_pairs,
            corpus.eval_pairs,
            f"embedded corpus: {corpus.describe()}",
        )

    train_texts = read_texts(cfg.train_text, cfg)
    train_pairs = read_pairs(cfg.train_pairs, cfg)
    if cfg.eval_text:
        eval_texts = read_texts(cfg.eval_text, cfg)
    else:
        train_texts, eval_texts = _split_held_out(train_texts, lambda t: t, cfg.eval_fraction)
    if cfg.eval_pairs:
        eval_pairs = read_pairs(cfg.eval_pairs, cfg)
    else:
        train_pairs, eval_pairs = _split_held_out(train_pairs, lambda p: p[0], cfg.eval_fraction)
    names = ", ".join(cfg.train_text + cfg.train_pairs)
    desc = (
        f"{names}: {len(train_texts)} texts ({sum(map(len, train_texts)):,} chars), "
        f"{len(train_pairs)} pairs; held out {len(eval_texts)} texts, {len(eval_pairs)} pairs"
    )
    return RawData(train_texts, eval_texts, train_pairs, eval_pairs, desc)


# ---------------------------------------------------------------------------- tokenization


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, list):
            for item in part:
                h.update(json.dumps(item, ensure_ascii=False).encode())
                h.update(b"\x00")
        else:
            h.update(str(part).encode())
        h.update(b"\x01")
    return h.hexdigest()[:20]


def _cached_map(ds: Dataset, fn, name: str, key: str, **kwargs) -> Dataset:
    folder = cache_root() / "tokenized"
    folder.mkdir(parents=True, exist_ok=True)
    return ds.map(
        fn,
        batched=True,
        cache_file_name=str(folder / f"{name}-{key}.arrow"),
        load_from_cache_file=True,
        desc=f"tokenizing {name}",
        **kwargs,
    )


def tokenize_texts(texts: list[str], tokenizer, name: str, tok_key: str) -> np.ndarray:
    """All texts as one flat int32 stream, each document followed by [SEP]."""
    if not texts:
        return np.zeros(0, dtype=np.int32)
    sep = tokenizer.sep_token_id

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [sep] for x in ids]}

    ds = Dataset.from_dict({"text": texts})
    ds = _cached_map(ds, encode, name, _fingerprint(tok_key, texts), remove_columns=["text"])
    return ds.data.column("input_ids").combine_chunks().flatten().to_numpy().astype(np.int32)


def tokenize_pairs(
    pairs: list[tuple[str, str]], tokenizer, name: str, tok_key: str
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not pairs:
        return [], []

    def encode(batch):
        return {
            "source": tokenizer(batch["document"], add_special_tokens=False)["input_ids"],
            "target": tokenizer(batch["summary"], add_special_tokens=False)["input_ids"],
        }

    ds = Dataset.from_dict({"document": [p[0] for p in pairs], "summary": [p[1] for p in pairs]})
    ds = _cached_map(
        ds, encode, name, _fingerprint(tok_key, pairs), remove_columns=["document", "summary"]
    )
    src = [np.asarray(x, dtype=np.int32) for x in ds.data.column("source").to_pylist()]
    tgt = [np.asarray(x, dtype=np.int32) for x in ds.data.column("target").to_pylist()]
    return src, tgt


def make_gap_pairs(
    texts: list[str], cfg: DataConfig, tokenizer, name: str
) -> list[tuple[str, str]]:
    """Gap-sentence (source, target) pairs from raw text, cached like the tokenized data."""
    if not texts:
        return []
    mask_token = tokenizer.sentence_mask_token
    # Roughly four characters per token: keep the gaps inside what the model will see.
    max_chars = cfg.source_len * 4

    def gaps(batch):
        src, tgt = [], []
        for text in batch["text"]:
            pair = gap_sentences(
                text, ratio=cfg.gap_ratio, max_chars=max_chars, mask_token=mask_token
            )
            if pair is not None:
                src.append(pair[0])
                tgt.append(pair[1])
        return {"document": src, "summary": tgt}

    ds = Dataset.from_dict({"text": texts})
    key = _fingerprint(cfg.gap_ratio, max_chars, mask_token, texts)
    num_proc = 2 if len(texts) > 20_000 and (os.cpu_count() or 1) > 1 else None
    ds = _cached_map(ds, gaps, name, key, remove_columns=["text"], num_proc=num_proc)
    if len(ds) == 0:  # no document had two sentences: the map produced no columns at all
        return []
    return list(zip(ds["document"], ds["summary"], strict=True))


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
    tok_key = _fingerprint(tokenizer.backend_tokenizer.to_str())
    masking = MaskingConfig(rate=cfg.mask_rate, whole_word=cfg.whole_word, span=cfg.span_masking)
    masking.validate()
    word_start = word_start_table(tokenizer)
    train, evals = {}, {}
    for name in objectives:
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    if "masked_lm" in objectives:
        for split, texts, out in (
            ("train", raw.train_texts, train),
            ("eval", raw.eval_texts, evals),
        ):
            flat = tokenize_texts(texts, tokenizer, f"text-{split}", tok_key)
            out["masked_lm"] = MaskedLMStream(
                flat, seq_len, ids, masking, word_start=word_start, vocab_size=len(tokenizer)
            )
    lengths = dict(
        source_len=cfg.source_len, target_len=cfg.target_len, pad_multiple=cfg.pad_multiple
    )
    if "gap_summary" in objectives:
        for split, texts, out in (
            ("train", raw.train_texts, train),
            ("eval", raw.eval_texts, evals),
        ):
            pairs = make_gap_pairs(texts, cfg, tokenizer, f"gaps-{split}")
            src, tgt = tokenize_pairs(pairs, tokenizer, f"gaps-{split}-tok", tok_key)
            out["gap_summary"] = Seq2SeqStream("gap_summary", src, tgt, ids, **lengths)
    if "summarize" in objectives:
        for split, pairs, out in (
            ("train", raw.train_pairs, train),
            ("eval", raw.eval_pairs, evals),
        ):
            src, tgt = tokenize_pairs(pairs, tokenizer, f"pairs-{split}", tok_key)
            out["summarize"] = Seq2SeqStream("summarize", src, tgt, ids, **lengths)
    return Streams(train, evals)
