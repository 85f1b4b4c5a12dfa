"""Train a tokenizer on the user's corpus with HF ``tokenizers`` (loading one, its special tokens
and the check against the model are ``model.tokenizer``, which a trained model needs alone).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import __version__ as _tk_version
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

log = logging.getLogger(__name__)

KINDS = ("bpe", "wordpiece", "unigram")
# Tokenizers train on at most about this many characters of the corpus.
SAMPLE_CHARS = 200_000_000


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
    max_chars: int = SAMPLE_CHARS,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (default), WordPiece or Unigram tokenizer on ``texts``.

    ``texts`` is iterated once (a memory-mapped table is read batch by batch); a corpus of
    more than ``max_chars`` characters is sampled with :func:`training_sample`. A tokenizer
    trained on prepared tables (:mod:`data.store`, what ``load_raw`` returns) is cached by
    the tables' keys and these settings, so a rerun on the same data does not train again.
    """
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
    cached = _cache_path(texts, kind, vocab_size, min_frequency, max_chars)
    if cached is not None and cached.is_file():
        try:
            return wrap(Tokenizer.from_str(cached.read_text()))
        except Exception as e:  # a damaged cache file (OSError, JSON errors): train again
            log.warning("ignoring the unreadable tokenizer cache %s (%s)", cached, e)
    total = _num_chars(texts)
    if total > max_chars:
        length = None
    tok.train_from_iterator(training_sample(texts, total, max_chars), trainer, length=length)
    if cached is not None:
        from data.store import write_text_atomic

        try:
            write_text_atomic(cached, tok.to_str())
        except OSError as e:
            log.warning("could not cache the tokenizer in %s (%s)", cached.parent, e)
    return wrap(tok)


def _cache_path(texts, kind: str, vocab_size: int, min_frequency: int, max_chars: int):
    """Where a tokenizer trained on prepared tables is cached; None for other inputs."""
    from data.store import Chain, _Table, content_digest, digest

    parts = texts.parts if isinstance(texts, Chain) else [texts]
    if not any(isinstance(p, _Table) for p in parts):
        return None
    keys = [p.key if isinstance(p, _Table) else content_digest(p) for p in parts]
    from data.pipeline import cache_root

    key = digest("tokenizer", keys, kind, vocab_size, min_frequency, max_chars, _tk_version)
    return cache_root() / "prepared" / f"tokenizer-{key}.json"


def _num_chars(texts) -> int:
    if hasattr(texts, "num_chars"):  # data.store tables keep their size
        return texts.num_chars
    if isinstance(texts, list | tuple):
        return sum(len(t) for t in texts)
    return 0  # a one-pass iterator: not counted, not sampled


def training_sample(texts: Iterable[str], total_chars: int, max_chars: int) -> Iterator[str]:
    """Every k-th document, k = ceil(total_chars / max_chars): a deterministic sample of about
    ``max_chars`` characters spread over the whole corpus (all of it when it is smaller)."""
    step = max(1, -(-total_chars // max_chars))
    for i, text in enumerate(texts):
        if i % step == 0:
            yield text


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


def layout_ids(tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """Tokens that are layout, not words: those that decode to whitespace alone (line breaks,
    indentation, a lone space marker). Masked-LM never masks them: on text with line breaks they
    are a tenth of all tokens, and a model that predicts a line break at every mask scores that
    tenth while learning no word (a WordPiece tokenizer, as BERT's, drops them in the first place).
    """
    n = len(tokenizer)
    texts = tokenizer.backend_tokenizer.decode_batch(
        [[i] for i in range(n)], skip_special_tokens=False
    )
    special = set(special_ids(tokenizer).as_list())
    return np.array(
        [i for i, t in enumerate(texts) if t.strip() == "" and i not in special], dtype=np.int64
    )
