"""Train a tokenizer on the user's corpus with HF ``tokenizers`` (loading one, its special tokens
and the check against the model are ``model.tokenizer``, which a trained model needs alone).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from model.tokenizer import (  # noqa: F401  (re-exported: the tokenizer's whole interface)
    ALIASES,
    SPECIAL_TOKENS,
    SpecialIds,
    TokenizerError,
    added_token,
    check_compatible,
    load_tokenizer,
    model_config,
    special_ids,
    wrap,
)

KINDS = ("bpe", "wordpiece", "unigram")


def check_tokenizer_options(kind: str, vocab_size: int) -> None:
    """Refuse a tokenizer kind or size that cannot be trained, before any data is read."""
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
    floor = len(SPECIAL_TOKENS) + (256 if kind == "bpe" else 0)
    if vocab_size <= floor:
        raise TokenizerError(
            f"vocabulary size {vocab_size} is too small: {kind} needs more than {floor} entries "
            f"({len(SPECIAL_TOKENS)} special tokens"
            + (" + 256 byte symbols)" if kind == "bpe" else ")")
        )


def train_tokenizer(
    texts: Iterable[str],
    *,
    kind: str = "bpe",
    vocab_size: int = 8192,
    min_frequency: int = 2,
    length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (default), WordPiece or Unigram tokenizer on ``texts``."""
    check_tokenizer_options(kind, vocab_size)
    specials = [added_token(role, tok) for role, tok in SPECIAL_TOKENS.items()]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
        # A prefix space makes a sentence-initial word the same token as it is mid-sentence.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk"]))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            unk_token=SPECIAL_TOKENS["unk"],
            show_progress=False,
        )
    tok.train_from_iterator(texts, trainer, length=length)
    return wrap(tok)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json so AutoTokenizer loads the folder."""
    tokenizer.save_pretrained(str(folder))


def word_start_table(tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """True for tokens that begin a word, for whole-word masking.

    Byte-level BPE marks a leading space with "Ġ" (and newlines with "Ċ"), WordPiece marks
    continuations with "##", Metaspace marks word starts with "▁". Special tokens count as
    starts so a word never spans a boundary.
    """
    n = len(tokenizer)
    table = np.zeros(n, dtype=bool)
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    model_kind = json.loads(tokenizer.backend_tokenizer.model.__getstate__())["type"]
    for token, index in vocab.items():
        if index >= n:
            continue
        if model_kind == "WordPiece":
            table[index] = not token.startswith("##")
        elif model_kind == "Unigram":
            table[index] = token.startswith("▁")
        else:
            table[index] = token[:1] in ("Ġ", "Ċ") or not token[:1].isalnum()
    table[special_ids(tokenizer).as_list()] = True
    return table
