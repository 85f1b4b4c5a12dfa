"""The vocabulary: a tokenizer trained on the user's corpus with HF ``tokenizers``, and the
tables masked LM reads of it (which tokens start a word, which are layout). Loading a tokenizer,
its special tokens and the check against the model are ``model.tokenizer``, which a trained
model needs alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import __version__ as _tk_version
from transformers import PreTrainedTokenizerFast

from data.cache import CacheDir, prepared_root
from data.config import check_tokenizer_options
from data.store import Chain, Table, content_digest, digest
from model.tokenizer import SPECIAL_TOKENS, added_token, special_ids, wrap

# Tokenizers train on at most about this many characters of the corpus (every k-th document).
# The trainer's memory follows the distinct words of what it reads: on text whose every line
# ends in a distinct number it grew from 1.0 GB at 10 MB of text to 1.6 GB at 100 MB under a
# 200M cap. 10M characters cost 0.2% more tokens per character on the embedded corpus's held-out
# text than all its 20M, and 0.3% on the numbered text (docs/performance.md).
SAMPLE_CHARS = 10_000_000


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
    tok, trainer = _untrained(kind, vocab_size, min_frequency)
    cache = _cache_dir(texts, kind, vocab_size, min_frequency, max_chars)

    def trained() -> Tokenizer:
        total = _num_chars(texts)
        sample_length = None if total > max_chars else length
        tok.train_from_iterator(
            training_sample(texts, total, max_chars), trainer, length=sample_length
        )
        return tok

    if cache is None:
        return wrap(trained())

    def fill() -> None:
        with cache.build() as tmp:
            (tmp / "tokenizer.json").write_text(trained().to_str())

    cache.obtain(fill)
    return wrap(Tokenizer.from_file(str(cache.path / "tokenizer.json")))


def _untrained(kind: str, vocab_size: int, min_frequency: int) -> tuple[Tokenizer, object]:
    """An empty tokenizer of ``kind`` with our special tokens, and the trainer that fills it:
    byte-level BPE (a prefix space makes a sentence-initial word the same token as it is
    mid-sentence), or WordPiece or Unigram over NFC-normalized text."""
    unk = SPECIAL_TOKENS["unk"]
    specials = [added_token(role, tok) for role, tok in SPECIAL_TOKENS.items()]
    common = dict(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    if kind == "bpe":
        model, normalizer = models.BPE(unk_token=unk), None
        pre, decoder = pre_tokenizers.ByteLevel(add_prefix_space=True), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            min_frequency=min_frequency, initial_alphabet=alphabet, **common
        )
    elif kind == "wordpiece":
        model, normalizer = models.WordPiece(unk_token=unk), normalizers.NFC()
        pre, decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(min_frequency=min_frequency, **common)
    else:
        model, normalizer = models.Unigram(), normalizers.NFC()
        pre, decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.UnigramTrainer(unk_token=unk, **common)
    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer, tok.decoder = pre, decoder
    return tok, trainer


def _cache_dir(texts, kind: str, vocab_size: int, min_frequency: int, max_chars: int):
    """The cache entry of a tokenizer trained on prepared tables; None for other inputs."""
    parts = texts.parts if isinstance(texts, Chain) else [texts]
    if not any(isinstance(p, Table) for p in parts):
        return None
    keys = [p.key if isinstance(p, Table) else content_digest(p) for p in parts]
    key = digest("tokenizer", keys, kind, vocab_size, min_frequency, max_chars, _tk_version)
    return CacheDir(prepared_root(), f"tokenizer-{key}")


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
