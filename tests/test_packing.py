"""Packed sequence-to-sequence batches (--pack-pairs): several examples a row, each with its own
positions and prefix, attending to itself alone. A packed batch trains exactly as the same
examples padded one a row do (loss and gradients to fp32 tolerance), on fewer positions, and
the copy path copies from each example's own source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.batching import MaskedLMStream, Seq2SeqStream
from data.objectives.masked_lm import MaskingConfig
from data.objectives.summarize import build_example, pack
from model.config import MiniTuringConfig
from model.constants import IGNORE_INDEX
from model.tokenizer import SpecialIds
from model.transformer import MiniTuringModel

SHAPE = dict(
    vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, ffn_size=64,
    max_position_embeddings=64, tokenizer_size=100,
)  # fmt: skip
IDS = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, sentence_mask=5)
SOURCE_LEN, TARGET_LEN = 40, 8


def examples(n: int = 12, seed: int = 0) -> tuple[list, list]:
    """Sources of 3-38 tokens and targets of 1-9 (some past the limits): mixed lengths."""
    rng = np.random.default_rng(seed)
    sources = [rng.integers(6, 100, size=int(rng.integers(3, 39))) for _ in range(n)]
    targets = [rng.integers(6, 100, size=int(rng.integers(1, 10))) for _ in range(n)]
    return sources, targets


def stream(packed: bool, masked_sources: bool = True, n: int = 12) -> Seq2SeqStream:
    masker = None
    if masked_sources:  # labels inside the sources as well ("filled" in place)
        masker = MaskedLMStream(
            np.zeros(0, dtype=np.int64), 16, IDS, MaskingConfig(rate=0.3, whole_word=False),
            word_start=None, vocab_size=100,
        )  # fmt: skip
    return Seq2SeqStream(
        "summarize", *examples(n), IDS, source_len=SOURCE_LEN, target_len=TARGET_LEN,
        pad_multiple=16, source_masker=masker, pack=packed,
    )  # fmt: skip


def batch_of(s: Seq2SeqStream, n: int = 12) -> dict[str, torch.Tensor]:
    b = s.batch(np.arange(n), np.arange(n), seed=3)
    return {k: torch.from_numpy(v) for k, v in b.items()}


def test_pack_puts_each_example_whole_in_one_row_with_its_own_positions():
    sources, targets = examples(20, seed=1)
    made = [
        build_example(s, t, cls_id=2, sep_id=3, source_len=SOURCE_LEN, target_len=TARGET_LEN)
        for s, t in zip(sources, targets, strict=True)
    ]
    out = pack(made, pad_id=0, multiple=16, limit=SOURCE_LEN + TARGET_LEN)
    rows, length = out["input_ids"].shape
    assert length == SOURCE_LEN + TARGET_LEN  # one row length: few shapes
    total = sum(len(ids) for ids, _, _ in made)
    assert -(-total // length) <= rows < len(made)  # fewer rows than one example each
    found = []
    for r in range(rows):
        segments = out["segment_ids"][r]
        real = out["attention_mask"][r].astype(bool)
        assert (segments[~real] == 0).all() and (out["input_ids"][r][~real] == 0).all()
        assert (out["labels"][r][~real] == IGNORE_INDEX).all()
        count = int(segments.max())
        assert (np.unique(segments[real]) == np.arange(1, count + 1)).all()
        for s in range(1, count + 1):
            at = np.flatnonzero(segments == s)
            assert (np.diff(at) == 1).all()  # contiguous, in order of position
            assert (out["position_ids"][r, at] == np.arange(len(at))).all()
            ids, labels = out["input_ids"][r, at], out["labels"][r, at]
            match = [i for i, e in enumerate(made) if len(e[0]) == len(at) and (e[0] == ids).all()]
            assert match, "a packed example is not one of the batch's"
            i = match[0]
            assert (made[i][1] == labels).all()
            assert (out["prefix_lengths"][r, at] == made[i][2]).all()
            found.append(i)
    assert sorted(found) == list(range(len(made)))  # every example exactly once


def test_a_packing_stream_orders_its_epoch_at_random():
    assert stream(packed=True).lengths() is None
    assert stream(packed=False).lengths() is not None


def loss_and_grads(inputs: dict, **options):
    torch.manual_seed(0)
    model = MiniTuringModel(MiniTuringConfig(**SHAPE, **options)).train()
    out = model(**inputs)
    (out.loss * out.num_label_tokens).backward()
    return out.loss.detach(), out.num_label_tokens, [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    "options",
    [
        {"position": "rope"},
        {"position": "learned"},
        {"position": "rope", "copy_attention": True},
        {"position": "learned", "copy_attention": True, "copy_layer": 1},
        {"position": "rope", "copy_attention": True, "sparse_outputs": False},
        {"position": "rope", "copy_attention": True, "attention": "sdpa"},
    ],
)
@pytest.mark.parametrize("masked_sources", [True, False])
def test_a_packed_batch_trains_as_the_padded_one(options, masked_sources, short_rows):
    padded = batch_of(stream(packed=False, masked_sources=masked_sources))
    packed = batch_of(stream(packed=True, masked_sources=masked_sources))
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    labelled = [int((b["labels"] != IGNORE_INDEX).sum()) for b in (padded, packed)]
    assert labelled[0] == labelled[1]
    loss, count, grads = loss_and_grads(padded, **options)
    packed_loss, packed_count, packed_grads = loss_and_grads(packed, **options)
    assert int(count) == int(packed_count)
    torch.testing.assert_close(loss, packed_loss)
    for a, b in zip(grads, packed_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_the_copy_path_copies_from_its_own_source_only():
    b = batch_of(stream(packed=True))
    model = MiniTuringModel(MiniTuringConfig(**SHAPE, position="rope", copy_attention=True))
    inputs = (b["input_ids"], b["attention_mask"], b["prefix_lengths"], b["position_ids"], None)
    segments = b["segment_ids"]
    _, copied, _ = model.eval()._states(*inputs, wanted=None, copy=True, segment_ids=segments)
    own = segments.unsqueeze(2) == segments.unsqueeze(1)  # (rows, queries, keys)
    in_source = (b["position_ids"] < b["prefix_lengths"]).unsqueeze(1)
    real = segments.unsqueeze(2) > 0
    assert (copied[(own & in_source).logical_not() & real] == 0).all()
    torch.testing.assert_close(copied.sum(-1)[real.squeeze(2)], torch.ones(int(real.sum())))


def test_packed_rows_are_refused_without_their_positions_or_labels():
    b = batch_of(stream(packed=True))
    model = MiniTuringModel(MiniTuringConfig(**SHAPE, position="rope"))
    without_positions = {k: v for k, v in b.items() if k != "position_ids"}
    with pytest.raises(ValueError, match="position_ids"):
        model(**without_positions)
    with pytest.raises(ValueError, match="labels"):
        model(**{k: v for k, v in b.items() if k != "labels"})


def test_auto_packs_the_sources_whose_batches_packing_shortens():
    from data.pipeline import PACK_WHEN_SAVED, packs

    mixed = stream(packed=False, masked_sources=False, n=12)  # 6-48 tokens, rows of 48
    assert mixed.packing_saves(batch_size=12) >= PACK_WHEN_SAVED
    assert packs(mixed, "auto", 12) and packs(mixed, "on", 12) and not packs(mixed, "off", 12)
    rng = np.random.default_rng(0)
    long = Seq2SeqStream(
        "summarize", [rng.integers(6, 100, size=36) for _ in range(40)],
        [rng.integers(6, 100, size=7) for _ in range(40)], IDS,
        source_len=SOURCE_LEN, target_len=TARGET_LEN, pad_multiple=16,
    )  # fmt: skip
    assert long.packing_saves(batch_size=8) == 0  # 45 tokens each: one a row either way
    assert not packs(long, "auto", 8) and packs(long, "on", 8)


def test_packing_is_a_train_py_flag_for_the_training_streams_only(tokenizer, texts):
    import train
    from data.config import DataConfig
    from data.pipeline import build_streams
    from data.raw import RawData
    from trainer.config import check_config
    from trainer.errors import TrainingError

    assert train.config_from_args([]).data.pack_pairs == "auto"
    assert train.config_from_args(["--pack-pairs", "on"]).data.pack_pairs == "on"
    assert "--pack-pairs" in train.build_parser().format_help()
    with pytest.raises(TrainingError, match="--pack-pairs must be auto, on or off"):
        check_config(train.config_from_args(["--pack-pairs", "yes"]))
    pairs = [(t, t.split(". ")[0]) for t in texts[:60]]
    raw = RawData(texts[:40], texts[40:50], pairs[:40], pairs[40:50], "test",
                  val_texts=texts[50:60], val_pairs=pairs[50:])  # fmt: skip
    objectives = ["gap_summary", "summarize"]
    for setting in ("off", "on"):
        cfg = DataConfig(pack_pairs=setting)
        streams = build_streams(raw, tokenizer, cfg, objectives, 32)
        for name in objectives:
            assert streams.train[name].pack is (setting == "on")
            assert not streams.eval[name].pack and not streams.val[name].pack
        assert ("packed" in streams.describe()) is (setting == "on")
