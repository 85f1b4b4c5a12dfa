"""Property-based tests: arbitrary text (any Unicode, control characters, special-token strings,
empty strings) through the tokenizer and every objective, checking the invariants the model
relies on: labels only where a token was chosen and equal to the original token there, special
tokens never chosen, lengths within their limits, the prefix where it should be, no crash."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.batching import MaskedLMStream, MixtureLoader, Seq2SeqStream
from data.objectives.gap_summary import gap_sentences, split_sentences
from data.objectives.masked_lm import MaskingConfig, block, mask_sequence
from data.objectives.summarize import build_example, collate
from data.vocab import word_start_table
from model.constants import IGNORE_INDEX
from model.tokenizer import SPECIAL_TOKENS, special_ids

PROPERTIES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIAL_STRINGS = list(SPECIAL_TOKENS.values())

# Any text, including control characters, and now and then a special token's spelling.
words = st.one_of(
    st.text(max_size=12),
    st.sampled_from(SPECIAL_STRINGS),
    st.sampled_from([". ", "! ", "? ", "\n\n", " The", " A", " 42", "\x00", "\t"]),
)
texts = st.lists(words, max_size=40).map("".join)
plain_texts = st.text(max_size=200).filter(lambda t: not any(s in t for s in SPECIAL_STRINGS))


@pytest.fixture(scope="module")
def setup(tokenizer):
    ids = special_ids(tokenizer)
    special = np.array(sorted(set(ids.as_list())), dtype=np.int64)
    return {
        "tok": tokenizer,
        "ids": ids,
        "special": special,
        "pool": np.setdiff1d(np.arange(len(tokenizer)), special),
        "word_start": word_start_table(tokenizer),
    }


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- tokenizer


@PROPERTIES
@given(text=plain_texts)
def test_tokenizer_is_lossless(setup, text):
    """Byte-level BPE: any text, any bytes, comes back exactly (a leading space is added to
    a text that lacks one, so a first word tokenizes as it does mid-sentence)."""
    tok = setup["tok"]
    ids = encode(tok, text)
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.unk_token_id not in ids  # every byte has a symbol: nothing is unknown
    expected = text if text == "" or text.startswith(" ") else " " + text
    assert tok.decode(ids) == expected


@PROPERTIES
@given(text=texts)
def test_special_token_spellings_in_text_become_special_tokens(setup, text):
    tok = setup["tok"]
    ids = encode(tok, text)
    assert all(0 <= i < len(tok) for i in ids)
    for name in SPECIAL_STRINGS:
        if name in text:
            assert tok.convert_tokens_to_ids(name) in ids


# ---------------------------------------------------------------------------- masked LM


@PROPERTIES
@given(
    text=texts,
    seed=st.integers(0, 2**32 - 1),
    rate=st.floats(0.01, 0.99),
    whole_word=st.booleans(),
    span=st.booleans(),
)
def test_masking_labels_only_chosen_tokens(setup, text, seed, rate, whole_word, span):
    ids_ = setup["ids"]
    tokens = np.array(encode(setup["tok"], text) + [ids_.sep], dtype=np.int64)
    seq = np.concatenate([[ids_.cls], tokens[:63]])
    cfg = MaskingConfig(rate=rate, whole_word=whole_word, span=span)
    inputs, labels = mask_sequence(
        seq, np.random.default_rng(seed), cfg, mask_id=ids_.mask, never_masked=setup["special"],
        random_pool=setup["pool"], word_start=setup["word_start"],
    )  # fmt: skip
    assert inputs.shape == labels.shape == seq.shape
    chosen = labels != IGNORE_INDEX
    assert (labels[chosen] == seq[chosen]).all()  # the label is the original token
    assert (inputs[~chosen] == seq[~chosen]).all()  # nothing else is touched
    assert not np.isin(seq[chosen], setup["special"]).any()  # specials are never chosen
    replaced = chosen & (inputs != seq)
    # A chosen token becomes [MASK] or a random ordinary token, or stays.
    assert np.isin(inputs[replaced], np.append(setup["pool"], ids_.mask)).all()


@PROPERTIES
@given(lengths=st.lists(st.integers(0, 60), min_size=1, max_size=6), seq_len=st.integers(8, 40))
def test_blocks_are_full_length_and_start_with_cls(setup, lengths, seq_len):
    rng = np.random.default_rng(sum(lengths))
    flat = rng.integers(6, len(setup["tok"]), sum(lengths)).astype(np.int32)
    n_blocks = len(flat) // (seq_len - 1)
    for index in range(n_blocks):
        b = block(flat, index, seq_len, setup["ids"].cls)
        assert len(b) == seq_len and b[0] == setup["ids"].cls
        assert (b[1:] == flat[index * (seq_len - 1) : (index + 1) * (seq_len - 1)]).all()


# ---------------------------------------------------------------------------- gap sentences


def _words(text: str) -> Counter:
    return Counter(text.split())


@PROPERTIES
@given(text=texts, ratio=st.floats(0.05, 0.95), max_chars=st.one_of(st.none(), st.integers(1, 400)))
def test_gap_sentences_hide_whole_sentences_and_lose_no_word(text, ratio, max_chars):
    mask = "[MASK_SENT]"
    result = gap_sentences(text, ratio=ratio, max_chars=max_chars, mask_token=mask)
    sentences = split_sentences(text)
    if len(sentences) < 2:
        assert result is None
        return
    if result is None:  # only when max_chars leaves a single sentence
        assert max_chars is not None and len(sentences[0]) + len(sentences[1]) >= max_chars
        return
    source, target = result
    assert target.strip()
    # Source words plus target words are exactly the leading sentences kept, plus one mask per
    # hidden sentence: at least one hidden, never all of them. (The text may hold the mask's
    # spelling itself, so masks are counted, not located.)
    together = _words(source) + _words(target)
    assert any(_gaps_fit(together, sentences[:k], mask) for k in range(2, len(sentences) + 1))


def _gaps_fit(together: Counter, kept: list[str], mask: str) -> bool:
    expected = _words(" ".join(kept))
    gaps = together[mask] - expected[mask]
    rest, expected_rest = Counter(together), Counter(expected)
    rest[mask] = expected_rest[mask] = 0
    return +rest == +expected_rest and 1 <= gaps <= len(kept) - 1


# ---------------------------------------------------------------------------- seq2seq layout


@PROPERTIES
@given(
    source=st.lists(st.integers(6, 399), max_size=80),
    target=st.lists(st.integers(6, 399), max_size=30),
    source_len=st.integers(4, 64),
    target_len=st.integers(2, 32),
)
def test_seq2seq_example_layout(source, target, source_len, target_len):
    cls, sep = 2, 3
    inputs, labels, prefix = build_example(
        source, target, cls_id=cls, sep_id=sep, source_len=source_len, target_len=target_len
    )
    kept_source = source[: source_len - 2]
    kept_target = target[: target_len - 1]
    assert prefix == len(kept_source) + 2 <= source_len
    assert len(inputs) == len(labels) == prefix + len(kept_target) <= source_len + target_len - 1
    assert inputs[0] == cls and inputs[prefix - 1] == sep
    assert list(inputs[1 : prefix - 1]) == kept_source and list(inputs[prefix:]) == kept_target
    # Nothing to predict inside the source; each target position predicts the next token,
    # and the last one predicts the end.
    assert (labels[: prefix - 1] == IGNORE_INDEX).all()
    assert list(labels[prefix - 1 :]) == kept_target + [sep]


@PROPERTIES
@given(pairs=st.lists(st.tuples(st.lists(st.integers(6, 99), max_size=20),
                                st.lists(st.integers(6, 99), max_size=8)), min_size=1, max_size=6))  # fmt: skip
def test_collate_pads_without_labels(pairs):
    examples = [
        build_example(s, t, cls_id=2, sep_id=3, source_len=16, target_len=6) for s, t in pairs
    ]
    batch = collate(examples, pad_id=0)
    longest = max(len(e[0]) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(examples), longest)
    for row, (ids, labels, prefix) in enumerate(examples):
        n = len(ids)
        assert (batch["labels"][row, :n] == labels).all()
        assert (batch["attention_mask"][row, :n] == 1).all()
        assert (batch["attention_mask"][row, n:] == 0).all()
        assert (batch["input_ids"][row, n:] == 0).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["prefix_lengths"][row] == prefix


# ---------------------------------------------------------------------------- the mixture


def _streams(setup, documents: list[str]) -> dict:
    tok, ids = setup["tok"], setup["ids"]
    encoded = [encode(tok, d) for d in documents]
    flat = np.array([i for e in encoded for i in e + [ids.sep]], dtype=np.int32)
    streams = {}
    masked = MaskedLMStream(
        flat, 16, ids, MaskingConfig(rate=0.3), word_start=setup["word_start"],
        vocab_size=len(tok),
    )  # fmt: skip
    if len(masked):
        streams["masked_lm"] = masked
    lengths = dict(source_len=16, target_len=8)
    gaps = [g for g in (gap_sentences(d, max_chars=64) for d in documents) if g is not None]
    if gaps:
        src, tgt = [encode(tok, s) for s, _ in gaps], [encode(tok, t) for _, t in gaps]
        streams["gap_summary"] = Seq2SeqStream("gap_summary", src, tgt, ids, **lengths)
    pairs = [(e, e[: len(e) // 2 + 1]) for e in encoded]
    streams["summarize"] = Seq2SeqStream(
        "summarize", [s for s, _ in pairs], [t for _, t in pairs], ids, **lengths
    )
    return streams


@PROPERTIES
@given(
    documents=st.lists(texts, min_size=1, max_size=8),
    seed=st.integers(0, 1000),
    weights=st.lists(st.floats(0.1, 10), min_size=3, max_size=3),
)
def test_mixture_batches_respect_every_invariant(setup, documents, seed, weights):
    streams = _streams(setup, documents)
    ids = setup["ids"]
    loader = MixtureLoader(streams, dict(zip(streams, weights, strict=False)), 3, seed)
    for n in range(1, 6):
        name, batch = loader.next_batch()
        inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
        assert inputs.shape == labels.shape and inputs.shape[0] == 3
        chosen = labels != IGNORE_INDEX
        if name == "masked_lm":
            assert inputs.shape[1] == 16 and (inputs[:, 0] == ids.cls).all()
            assert not np.isin(labels[chosen], setup["special"]).any()
        else:
            assert inputs.shape[1] <= 16 + 8
            prefix = batch["prefix_lengths"].numpy()
            length = batch["attention_mask"].numpy().sum(1)
            for row in range(3):
                assert inputs[row, 0] == ids.cls and inputs[row, prefix[row] - 1] == ids.sep
                where = np.flatnonzero(chosen[row])
                assert list(where) == list(range(prefix[row] - 1, length[row]))
                assert labels[row, length[row] - 1] == ids.sep
        assert loader.state_dict()["batches"] == n
        assert sum(loader.state_dict()["consumed"].values()) == 3 * n
