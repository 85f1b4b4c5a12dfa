"""Masking statistics, gap-sentence selection, sequence-to-sequence layout, and the mixture
loader's ordering, sharding and resumable position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.batching import (
    MaskedLMStream,
    MixtureLoader,
    Seq2SeqStream,
    epoch_order,
    pieces_for,
    split_batch,
)
from data.objectives.gap_summary import gap_sentences, sentence_scores, split_sentences
from data.objectives.masked_lm import MaskingConfig, mask_sequence
from data.objectives.summarize import PAD_MULTIPLE, build_example, collate
from data.vocab import layout_ids, word_start_table
from model.constants import IGNORE_INDEX
from model.tokenizer import special_ids


@pytest.fixture(scope="module")
def encoded(texts, tokenizer):
    ids = tokenizer(texts[:200], add_special_tokens=False)["input_ids"]
    return np.concatenate([np.array(x + [tokenizer.sep_token_id]) for x in ids])


def mask_many(encoded, tokenizer, cfg, n=200, seq=64):
    ids = special_ids(tokenizer)
    special = np.array(ids.as_list())
    pool = np.setdiff1d(np.arange(len(tokenizer)), special)
    table = word_start_table(tokenizer)
    results = []
    for i in range(n):
        x = np.concatenate([[ids.cls], encoded[i * seq : (i + 1) * seq]]).astype(np.int64)
        inp, lab = mask_sequence(
            x, np.random.default_rng(i), cfg, mask_id=ids.mask, never_masked=special,
            random_pool=pool, word_start=table,
        )  # fmt: skip
        results.append((x, inp, lab))
    return results, ids, table


@pytest.mark.parametrize("rate", [0.15, 0.4])
def test_masking_rate(encoded, tokenizer, rate):
    results, ids, _ = mask_many(encoded, tokenizer, MaskingConfig(rate=rate))
    maskable = sum(int((~np.isin(x, ids.as_list())).sum()) for x, _, _ in results)
    masked = sum(int((lab != IGNORE_INDEX).sum()) for _, _, lab in results)
    assert abs(masked / maskable - rate) < 0.03


def test_80_10_10_and_labels(encoded, tokenizer):
    results, ids, _ = mask_many(encoded, tokenizer, MaskingConfig(rate=0.3))
    as_mask = as_random = kept = 0
    for x, inp, lab in results:
        chosen = lab != IGNORE_INDEX
        # Labels hold the original token exactly where chosen; elsewhere the input is untouched.
        assert (lab[chosen] == x[chosen]).all()
        assert (inp[~chosen] == x[~chosen]).all()
        as_mask += int((inp[chosen] == ids.mask).sum())
        kept += int((inp[chosen] == x[chosen]).sum())
        as_random += int(((inp[chosen] != ids.mask) & (inp[chosen] != x[chosen])).sum())
    total = as_mask + as_random + kept
    assert abs(as_mask / total - 0.8) < 0.03
    # A random replacement can draw the original token, so "random" is a little under 10%.
    assert abs(as_random / total - 0.1) < 0.02
    assert abs(kept / total - 0.1) < 0.02


def test_special_tokens_are_never_masked(encoded, tokenizer):
    results, ids, _ = mask_many(encoded, tokenizer, MaskingConfig(rate=0.4))
    for x, _, lab in results:
        special = np.isin(x, ids.as_list())
        assert (lab[special] == IGNORE_INDEX).all()


def test_whole_words_are_masked_together(encoded, tokenizer):
    results, ids, table = mask_many(encoded, tokenizer, MaskingConfig(rate=0.15, whole_word=True))
    split_words = 0
    for x, _, lab in results:
        chosen = lab != IGNORE_INDEX
        for p in range(1, len(x)):
            special = np.isin(x[p - 1 : p + 1], ids.as_list()).any()
            if not table[x[p]] and not special:  # continues the word
                assert chosen[p] == chosen[p - 1]
                split_words += 1
    assert split_words > 50  # the check above actually ran on multi-piece words


def test_token_level_masking_splits_words(encoded, tokenizer):
    results, ids, table = mask_many(encoded, tokenizer, MaskingConfig(rate=0.3, whole_word=False))
    differ = 0
    for x, _, lab in results:
        chosen = lab != IGNORE_INDEX
        differ += sum(chosen[p] != chosen[p - 1] for p in range(1, len(x)) if not table[x[p]])
    assert differ > 0


def test_span_masking_makes_contiguous_spans(encoded, tokenizer):
    cfg = MaskingConfig(rate=0.15, whole_word=True, span=True, mean_span=3.0)
    results, ids, table = mask_many(encoded, tokenizer, cfg, n=300)
    lengths = []
    maskable = masked = 0
    for x, _, lab in results:
        chosen = lab != IGNORE_INDEX
        maskable += int((~np.isin(x, ids.as_list())).sum())
        masked += int(chosen.sum())
        run = 0
        for p in range(len(x)):
            if chosen[p] and table[x[p]]:
                run += 1
            elif not chosen[p] and run:
                lengths.append(run)
                run = 0
    assert abs(masked / maskable - 0.15) < 0.04
    assert np.mean(lengths) > 1.8  # spans of several words, not single words


def test_gap_sentences_pick_the_central_sentence():
    text = (
        "Python lists are mutable sequences of objects. "
        "The weather was pleasant yesterday afternoon. "
        "Lists store objects and list methods change lists in place. "
        "Mutable lists of objects are common sequences in Python programs."
    )
    sents = split_sentences(text)
    assert len(sents) == 4
    scores = sentence_scores(sents)
    assert int(np.argmin(scores)) == 1  # the off-topic sentence is least central
    source, target = gap_sentences(text, ratio=0.25, mask_token="<gap>")
    chosen = sents[int(np.argmax(scores))]
    assert target == chosen
    assert source.count("<gap>") == 1 and chosen not in source
    assert gap_sentences("Only one sentence here.") is None


def test_gap_targets_keep_document_order():
    text = "A b c. D e f a b c. G h i. A b c d e f."
    source, target = gap_sentences(text, ratio=0.5)
    picked = target.split(". ")
    order = [split_sentences(text).index(s if s.endswith(".") else s + ".") for s in picked]
    assert order == sorted(order)


def test_seq2seq_example_layout():
    ids, labels, prefix = build_example(
        [10, 11, 12], [20, 21], cls_id=2, sep_id=3, source_len=10, target_len=5
    )
    assert ids.tolist() == [2, 10, 11, 12, 3, 20, 21]
    assert prefix == 5
    assert labels.tolist() == [IGNORE_INDEX] * 4 + [20, 21, 3]
    # Truncation: source to source_len - 2 tokens, target to target_len - 1 (plus [SEP]).
    ids, labels, prefix = build_example(
        list(range(10, 30)), list(range(40, 60)), cls_id=2, sep_id=3, source_len=6, target_len=4
    )
    assert prefix == 6 and len(ids) == 6 + 3 and labels[-1] == 3
    batch = collate(
        [
            build_example([5], [6], cls_id=2, sep_id=3, source_len=8, target_len=4),
            (ids, labels, prefix),
        ],
        0,
    )
    assert batch["input_ids"].shape == (2, 9)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1] + [0] * 5
    assert (batch["labels"][0, 4:] == IGNORE_INDEX).all()


def test_layout_tokens_are_whitespace_and_never_masked(tokenizer, texts):
    layout = layout_ids(tokenizer)
    decoded = [tokenizer.decode([int(i)]) for i in layout]
    assert decoded and all(t.strip() == "" for t in decoded)
    assert tokenizer("a\nb", add_special_tokens=False)["input_ids"][1] in layout
    assert not set(layout) & set(special_ids(tokenizer).as_list())
    # Text laid out in lines and indented, as docstrings and code are.
    text = "\n".join("    " + t for t in texts[:60])
    flat = np.array(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    stream = MaskedLMStream.from_tokenizer(flat, 64, tokenizer, MaskingConfig())
    batch = stream.batch(np.arange(len(stream)), np.arange(len(stream)), seed=0)
    labels = batch["labels"][batch["labels"] != IGNORE_INDEX]
    assert np.isin(batch["input_ids"], layout).mean() > 0.05  # present, so could be masked
    assert not np.isin(labels, layout).any()
    maskable = ~np.isin(batch["input_ids"], stream.never_masked) | (batch["labels"] != IGNORE_INDEX)
    assert 0.12 < len(labels) / maskable.sum() < 0.18  # the rate is of the words


# ---------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def streams(encoded, tokenizer):
    ids = special_ids(tokenizer)
    mlm = MaskedLMStream(
        encoded,
        32,
        ids,
        MaskingConfig(),
        word_start=word_start_table(tokenizer),
        vocab_size=len(tokenizer),
    )
    rng = np.random.default_rng(0)
    src = [rng.integers(6, 300, rng.integers(5, 40)) for _ in range(90)]
    tgt = [rng.integers(6, 300, rng.integers(2, 10)) for _ in range(90)]
    s2s = Seq2SeqStream("summarize", src, tgt, ids, source_len=32, target_len=8)
    return {"masked_lm": mlm, "summarize": s2s}


def test_mixture_weights_are_honoured(streams):
    loader = MixtureLoader(streams, {"masked_lm": 3.0, "summarize": 1.0}, 4, seed=0)
    names = [loader.objective_at(i) for i in range(4000)]
    assert abs(names.count("masked_lm") / 4000 - 0.75) < 0.03


def test_resumed_loader_continues_identically(streams):
    weights = {"masked_lm": 1.0, "summarize": 1.0}
    a = MixtureLoader(streams, weights, 4, seed=3)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(5)]
    b = MixtureLoader(streams, weights, 4, seed=3)
    b.load_state_dict(state)
    for (n1, x1), (n2, x2) in zip(expected, [b.next_batch() for _ in range(5)], strict=True):
        assert n1 == n2
        for k in x1:
            assert (x1[k] == x2[k]).all()


@pytest.mark.parametrize("name", ["masked_lm", "summarize"])
def test_sharding_covers_an_epoch_exactly_once(streams, name):
    """Two ranks with batch b draw, between them, exactly what one rank with 2b draws, and an
    epoch's examples are each seen once."""
    n = len(streams[name])
    world, b = 2, 3
    loaders = [
        MixtureLoader(streams, {name: 1.0}, b, seed=1, rank=r, world_size=world)
        for r in range(world)
    ]
    single = MixtureLoader(streams, {name: 1.0}, b * world, seed=1)
    seen, seen_single = [], []
    for _ in range(n // (b * world)):
        start = loaders[0].position.consumed[name]
        for loader in loaders:
            seen += loader.examples_for(name, start)[0].tolist()
            loader.next_batch()
        seen_single += single.examples_for(name, single.position.consumed[name])[0].tolist()
        single.next_batch()
    assert seen == seen_single
    assert len(seen) == len(set(seen))
    assert set(seen) <= set(range(n))


def test_masked_sources_label_their_words_and_leave_the_target_alone(encoded, tokenizer):
    """--source-mask-rate: each source is masked as masked LM masks a block and its masked
    positions are labelled with their tokens; [CLS], [SEP] and the target are untouched; the
    same sample key gives the same mask."""
    ids = special_ids(tokenizer)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(encoded) - 60, 40)
    src = [encoded[s : s + rng.integers(20, 60)] for s in starts]
    tgt = [encoded[s : s + 6] for s in starts]
    masker = MaskedLMStream.from_tokenizer(
        np.zeros(0, np.int64), 32, tokenizer, MaskingConfig(rate=0.3)
    )
    lengths = dict(source_len=64, target_len=8)
    plain = Seq2SeqStream("summarize", src, tgt, ids, **lengths)
    masked = Seq2SeqStream("summarize", src, tgt, ids, **lengths, source_masker=masker)
    rows, keys = np.arange(40), np.arange(100, 140)
    a, b = plain.batch(rows, keys, seed=0), masked.batch(rows, keys, seed=0)
    assert (masked.batch(rows, keys, seed=0)["input_ids"] == b["input_ids"]).all()
    assert not (masked.batch(rows, keys + 1, seed=0)["input_ids"] == b["input_ids"]).all()
    filled = chosen = as_mask = 0
    for row, p in enumerate(b["prefix_lengths"]):
        source = slice(1, p - 1)
        new = b["labels"][row, source] != IGNORE_INDEX
        # Masked-LM labels there: the original token, where the input changed (mostly).
        assert (b["labels"][row, source][new] == a["input_ids"][row, source][new]).all()
        assert (b["input_ids"][row, source][~new] == a["input_ids"][row, source][~new]).all()
        as_mask += int((b["input_ids"][row, source][new] == ids.mask).sum())
        # [CLS] and [SEP] kept, the target's inputs and labels as without masking.
        for k in ("input_ids", "labels"):
            assert (b[k][row, p - 1 :] == a[k][row, p - 1 :]).all()
        assert b["input_ids"][row, 0] == ids.cls and b["input_ids"][row, p - 1] == ids.sep
        filled += int(new.sum())
        chosen += int((~np.isin(a["input_ids"][row, source], masker.never_masked)).sum())
    assert 0.2 < filled / chosen < 0.4  # the rate is of the words
    assert 0.7 < as_mask / filled < 0.9  # 80% become [MASK]


def test_same_sample_same_mask_across_world_sizes(streams):
    one = MixtureLoader(streams, {"masked_lm": 1.0}, 4, seed=5)
    two = [
        MixtureLoader(streams, {"masked_lm": 1.0}, 2, seed=5, rank=r, world_size=2)
        for r in range(2)
    ]
    _, full = one.next_batch()
    halves = [loader.next_batch()[1] for loader in two]
    for k in full:
        assert (full[k] == np.concatenate([h[k] for h in halves])).all()


def test_length_bucketing_reduces_padding(streams):
    loader = MixtureLoader(streams, {"summarize": 1.0}, 8, seed=0)
    lengths = streams["summarize"].lengths()
    spread = []
    for _ in range(10):
        idx, _ = loader.examples_for("summarize", loader.position.consumed["summarize"])
        loader.next_batch()
        spread.append(lengths[idx].max() - lengths[idx].min())
    rng = np.random.default_rng(0)
    random_spread = [np.ptp(lengths[rng.choice(len(lengths), 8, replace=False)]) for _ in range(50)]
    assert np.mean(spread) < np.mean(random_spread)


def test_seq2seq_batches_pad_to_a_multiple_of_16_within_the_limit():
    def example(n):
        return np.arange(6, 6 + n), np.full(n, IGNORE_INDEX), 3

    for lengths, limit, expected in (
        ([20, 33], 288, 48),
        ([40, 48], 288, 48),
        ([250], 258, 256),
        ([250], 252, 252),
    ):
        batch = collate([example(n) for n in lengths], 0, multiple=16, limit=limit)
        assert batch["input_ids"].shape == (len(lengths), expected)
        assert batch["attention_mask"].sum(1).tolist() == lengths  # padding is masked out


def test_a_long_batch_splits_into_row_pieces_cut_to_their_own_length():
    """Sorted by length as the buckets make them: the short rows' piece drops the padding only
    the long rows need, and every label and real token is in exactly one piece."""
    lengths = [10, 12, 20, 30, 70, 90, 100, 200]
    examples = [(np.arange(6, 6 + n), np.arange(n) % 5 - 1, 3) for n in lengths]
    whole = {k: torch.from_numpy(v) for k, v in collate(examples, 0, multiple=PAD_MULTIPLE).items()}
    assert whole["input_ids"].shape == (8, 256)
    assert pieces_for(whole, 0) == 1 and pieces_for(whole, 8 * 256) == 1
    assert pieces_for(whole, 1024) == 2 and pieces_for(whole, 512) == 4
    assert pieces_for(whole, 1) == 8  # never less than a row
    pieces = split_batch(whole, 4)
    assert [p["input_ids"].shape for p in pieces] == [(2, 64), (2, 64), (2, 128), (2, 256)]
    assert torch.equal(torch.cat([p["prefix_lengths"] for p in pieces]), whole["prefix_lengths"])
    for key in ("input_ids", "labels", "attention_mask"):
        joined = [row for p in pieces for row in p[key]]
        for row, original in zip(joined, whole[key], strict=True):
            assert torch.equal(row, original[: len(row)])
            assert (original[len(row) :] == (IGNORE_INDEX if key == "labels" else 0)).all()
    assert split_batch(whole, 1) == [whole]
    # A masked-LM batch (whole blocks, no padding) splits by rows only.
    block = {"input_ids": torch.ones(8, 32, dtype=torch.long), "labels": torch.ones(8, 32)}
    assert [p["input_ids"].shape for p in split_batch(block, 2)] == [(4, 32), (4, 32)]


def test_length_buckets_stay_whole_when_the_epoch_is_not_whole_batches():
    """The remainder (n % batch examples) must not shift the batches after it across length
    groups: every full batch then holds similar lengths."""
    lengths = np.random.default_rng(0).integers(20, 300, size=1000 + 7)
    for seed in range(3):
        order = epoch_order(len(lengths), seed, 2, 0, lengths, 32)
        assert sorted(order.tolist()) == list(range(len(lengths)))
        full = lengths[order[: len(order) // 32 * 32]].reshape(-1, 32)
        assert 1 - full.sum() / (full.max(1) * 32).sum() < 0.03  # padding share


def test_epoch_order_is_four_bytes_an_example_and_the_order_it_always_was():
    """A run resumed across versions keeps its order: the int32 shuffle is the int64 one."""
    from data.batching import _ORDER, _rng

    order = epoch_order(10_007, 3, 0, 2, None, 32)
    assert order.dtype == np.int32
    assert np.array_equal(order, _rng(3, _ORDER, 0, 2).permutation(10_007))


def test_objective_without_data_is_a_clear_error(streams):
    with pytest.raises(ValueError, match="no data for objective"):
        MixtureLoader(streams, {"gap_summary": 1.0}, 4, seed=0)
