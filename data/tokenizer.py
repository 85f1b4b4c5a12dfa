"""Train a tokenizer on the user's corpus (HF ``tokenizers``) or load one, and check it
against the model.

Every tokenizer we use carries the same special tokens, which the objectives rely on:

    pad  [PAD]        padding
    unk  [UNK]        unknown
    cls  [CLS]        start of every sequence (also bos)
    sep  [SEP]        end of a segment / sequence (also eos)
    mask [MASK]       a hidden word (masked LM); absorbs the space before it
    sentence_mask [MASK_SENT]  a hidden sentence (gap-sentence generation)

A loaded tokenizer that lacks some of them (say a RoBERTa one with ``<mask>``) keeps its own
names where a common alias exists and gains the missing ones as added special tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import __version__ as _tk_version
from transformers import PreTrainedTokenizerFast

from model.config import MiniTuringConfig, round_vocab

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
    "sentence_mask": "[MASK_SENT]",
}
# Other spellings of the same roles, so an existing BERT/RoBERTa tokenizer.json can be used.
ALIASES = {
    "pad": ["[PAD]", "<pad>"],
    "unk": ["[UNK]", "<unk>"],
    "cls": ["[CLS]", "<s>", "<cls>", "<|startoftext|>"],
    "sep": ["[SEP]", "</s>", "<sep>", "<|endoftext|>"],
    "mask": ["[MASK]", "<mask>"],
    "sentence_mask": ["[MASK_SENT]", "<mask_1>", "<mask_sent>"],
}
KINDS = ("bpe", "wordpiece", "unigram")
# Tokenizers train on at most about this many characters of the corpus.
SAMPLE_CHARS = 200_000_000


class TokenizerError(ValueError):
    """A tokenizer that cannot serve the model or the objectives."""


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    sentence_mask: int

    def as_list(self) -> list[int]:
        return [self.pad, self.unk, self.cls, self.sep, self.mask, self.sentence_mask]


# ---------------------------------------------------------------------------- training


def _added(role: str, content: str) -> AddedToken:
    # The mask swallows the space to its left, so "the [MASK] value" tokenizes like a real
    # word in that slot (byte-level words carry their leading space).
    return AddedToken(content, special=True, normalized=False, lstrip=role == "mask")


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
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
    specials = [_added(role, tok) for role, tok in SPECIAL_TOKENS.items()]
    if vocab_size <= len(specials) + (256 if kind == "bpe" else 0):
        floor = len(specials) + (256 if kind == "bpe" else 0)
        raise TokenizerError(
            f"vocabulary size {vocab_size} is too small: {kind} needs more than {floor} entries "
            f"({len(specials)} special tokens" + (" + 256 byte symbols)" if kind == "bpe" else ")")
        )
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
            return _wrap(Tokenizer.from_str(cached.read_text()))
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
    return _wrap(tok)


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


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Give a raw ``tokenizers`` object our special tokens and the transformers interface."""
    vocab = tok.get_vocab(with_added_tokens=True)
    names = {}
    for role, aliases in ALIASES.items():
        found = next((a for a in aliases if a in vocab), None)
        if found is None:
            found = SPECIAL_TOKENS[role]
            tok.add_special_tokens([_added(role, found)])
        names[role] = found
    cls_id, sep_id = tok.token_to_id(names["cls"]), tok.token_to_id(names["sep"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{names['cls']} $A {names['sep']}",
        pair=f"{names['cls']} $A {names['sep']} $B:1 {names['sep']}:1",
        special_tokens=[(names["cls"], cls_id), (names["sep"], sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=names["pad"],
        unk_token=names["unk"],
        cls_token=names["cls"],
        sep_token=names["sep"],
        bos_token=names["cls"],
        eos_token=names["sep"],
        mask_token=names["mask"],
        extra_special_tokens={"sentence_mask_token": names["sentence_mask"]},
        model_input_names=["input_ids", "attention_mask"],
    )


# ---------------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a ``tokenizer.json`` file, or a folder that holds one (a run folder, say)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(
            f"no tokenizer at {path}: expected a tokenizer.json file or a folder holding one"
        )
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises plain Exceptions
        raise TokenizerError(f"{file} is not a valid tokenizer.json: {err}") from None
    return _wrap(tok)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json so AutoTokenizer loads the folder."""
    tokenizer.save_pretrained(str(folder))


def special_ids(tokenizer: PreTrainedTokenizerFast) -> SpecialIds:
    return SpecialIds(
        pad=tokenizer.pad_token_id,
        unk=tokenizer.unk_token_id,
        cls=tokenizer.cls_token_id,
        sep=tokenizer.sep_token_id,
        mask=tokenizer.mask_token_id,
        sentence_mask=tokenizer.convert_tokens_to_ids(tokenizer.sentence_mask_token),
    )


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


def model_config(tokenizer: PreTrainedTokenizerFast, **shape) -> MiniTuringConfig:
    """A model config sized for ``tokenizer`` (embedding rows rounded up to a multiple of 64)
    with its special-token ids; ``shape`` holds the other MiniTuringConfig fields."""
    ids = special_ids(tokenizer)
    return MiniTuringConfig(
        vocab_size=round_vocab(len(tokenizer)),
        tokenizer_size=len(tokenizer),
        pad_token_id=ids.pad,
        unk_token_id=ids.unk,
        bos_token_id=ids.cls,
        eos_token_id=ids.sep,
        mask_token_id=ids.mask,
        sentence_mask_token_id=ids.sentence_mask,
        **shape,
    )


def check_compatible(tokenizer: PreTrainedTokenizerFast, config, where: str = "") -> None:
    """Refuse a model config and tokenizer that disagree, naming the mismatch."""
    place = f" in {where}" if where else ""
    n = len(tokenizer)
    problems = []
    if n > config.vocab_size:
        problems.append(
            f"the tokenizer has {n} entries but the model's embedding has only {config.vocab_size} rows"
        )
    if config.tokenizer_size is not None and config.tokenizer_size != n:
        problems.append(
            f"config says the tokenizer has {config.tokenizer_size} entries, it has {n}"
        )
    ids = special_ids(tokenizer)
    expected = {
        "pad_token_id": ids.pad,
        "unk_token_id": ids.unk,
        "bos_token_id": ids.cls,
        "eos_token_id": ids.sep,
        "mask_token_id": ids.mask,
        "sentence_mask_token_id": ids.sentence_mask,
    }
    for name, value in expected.items():
        if getattr(config, name, None) != value:
            problems.append(
                f"config {name}={getattr(config, name, None)} but the tokenizer's is {value}"
            )
    if problems:
        raise TokenizerError(f"tokenizer and model config disagree{place}: " + "; ".join(problems))
