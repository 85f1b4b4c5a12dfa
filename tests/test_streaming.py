"""--streaming: training text read as an IterableDataset and packed on the fly. Every text's
tokens come once per pass, in order, split across processes without overlap; a batch has the
mapped path's keys, dtypes and shapes; a run stopped and resumed equals the run never stopped,
across the end of a pass; and what the stream cannot train is refused before any data is read.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import TINY_FLAGS, latest_step, metrics, write_corpus
from fault_runner import assert_same_run
from test_resume import interrupting

import train
from data.batching import MixtureLoader
from data.config import DataConfig
from data.objectives.masked_lm import MaskingConfig
from data.streaming import (
    HELD_OUT_DOCS,
    PackedText,
    StreamingLoader,
    held_out_texts,
    text_dataset,
)
from trainer.errors import TrainingError
from trainer.loop import Stopped

pytestmark = pytest.mark.usefixtures("without_plot")

STEPS = 12
SEQ_LEN = 32  # TINY_FLAGS' --seq-len


def encoded(tokenizer, docs: list[str]) -> np.ndarray:
    """The documents' tokens, each followed by [SEP]: what the mapped path's flat array holds."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(x + [tokenizer.sep_token_id]) for x in ids])


def packed(cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1) -> PackedText:
    def make():
        return text_dataset(cfg, rank=rank, world_size=world_size)

    return PackedText(make, tokenizer, SEQ_LEN, MaskingConfig())


def drawn_tokens(stream: PackedText, blocks: int) -> np.ndarray:
    """The tokens of the next ``blocks`` blocks, [CLS] left out, one after the other."""
    out = stream.next_blocks(blocks)
    assert all(b[0] == stream.cls and len(b) == SEQ_LEN for b in out)
    return np.concatenate([b[1:] for b in out])


# ---------------------------------------------------------------------------- the stream


def test_each_text_comes_once_per_pass_in_order(corpus_files, texts, tokenizer):
    """Without --eval-text the first documents are held out and never trained on; the rest
    come exactly once per pass, the next pass starting right after the last."""
    text_file, _ = corpus_files
    cfg = DataConfig(train_text=[str(text_file)], streaming=True)
    held = held_out_texts(cfg)
    assert held == texts[:HELD_OUT_DOCS]
    one_pass = encoded(tokenizer, texts[HELD_OUT_DOCS:])
    body = SEQ_LEN - 1
    blocks = 2 * len(one_pass) // body + 3  # into a third pass
    got = drawn_tokens(packed(cfg, tokenizer), blocks)
    expected = np.concatenate([one_pass, one_pass, one_pass])[: blocks * body]
    np.testing.assert_array_equal(got, expected)


def test_processes_share_the_stream_without_overlap(small_corpus, texts, tokenizer):
    """split_dataset_by_node: with one source, rank r packs documents r, r + N, ...; with as
    many sources as processes, each packs its own source. Either way every document is read by
    exactly one process."""
    train_file, eval_file = small_corpus
    docs = texts[:16]
    cfg = DataConfig(train_text=[str(train_file)], eval_text=[str(eval_file)], streaming=True)
    for rank in range(2):
        mine = encoded(tokenizer, docs[rank::2])
        body = SEQ_LEN - 1
        got = drawn_tokens(packed(cfg, tokenizer, rank, 2), len(mine) // body)
        np.testing.assert_array_equal(got, mine[: len(got)])
    halves = (
        write_corpus(train_file.parent / "a", docs[:8])[0],
        write_corpus(train_file.parent / "b", docs[8:])[0],
    )
    cfg = DataConfig(train_text=[str(h) for h in halves], eval_text=[str(eval_file)])
    for rank in range(2):
        mine = encoded(tokenizer, docs[rank * 8 : rank * 8 + 8])
        got = drawn_tokens(packed(cfg, tokenizer, rank, 2), len(mine) // (SEQ_LEN - 1))
        np.testing.assert_array_equal(got, mine[: len(got)])


@pytest.mark.parametrize("world_size", [1, 2])
def test_loader_state_resumes_exactly(small_corpus, tokenizer, world_size):
    """A loader rebuilt from another's state_dict() draws exactly the batches the first would
    have drawn next (the dataset's position and the packing buffer travel in it), also when the
    state is taken in the middle of a document and passes later."""
    train_file, eval_file = small_corpus
    cfg = DataConfig(train_text=[str(train_file)], eval_text=[str(eval_file)], streaming=True)

    def loader(rank: int) -> StreamingLoader:
        streams = {"masked_lm": packed(cfg, tokenizer, rank, world_size)}
        return StreamingLoader(
            streams, {"masked_lm": 1.0}, 8, seed=3, rank=rank, world_size=world_size
        )

    for rank in range(world_size):
        straight = loader(rank)
        batches = [straight.next_batch()[1] for _ in range(30)]  # three passes and more
        for cut in (1, 7, 13, 29):
            first = loader(rank)
            for _ in range(cut):
                first.next_batch()
            state = first.state_dict()
            assert state["stream"]["buffer"] or cut == 0  # the cut falls inside a document
            resumed = loader(rank)
            resumed.load_state_dict(state)
            for expected in batches[cut:]:
                name, batch = resumed.next_batch()
                assert name == "masked_lm"
                for key in expected:
                    assert np.array_equal(batch[key].numpy(), expected[key].numpy()), (cut, key)


def test_a_streamed_batch_looks_like_a_mapped_one(small_corpus, tokenizer):
    """Same keys, dtypes and shapes as the prepared path's masked-LM batch; the same block
    under the same sample key is masked the same way."""
    from data.batching import MaskedLMStream

    train_file, eval_file = small_corpus
    cfg = DataConfig(train_text=[str(train_file)], eval_text=[str(eval_file)], streaming=True)
    flat = encoded(tokenizer, train_file.read_text().splitlines()).astype(np.int32)
    mapped = MaskedLMStream.from_tokenizer(flat, SEQ_LEN, tokenizer, MaskingConfig())
    # The mixture loader shuffles the blocks of an epoch; ask it for blocks 0..7 in order.
    expected = mapped.batch(np.arange(8), np.arange(8), seed=0)
    streamed = StreamingLoader(
        {"masked_lm": packed(cfg, tokenizer)}, {"masked_lm": 1.0}, 8, seed=0
    ).next_batch()[1]
    mixture = MixtureLoader({"masked_lm": mapped}, {"masked_lm": 1.0}, 8, seed=0).next_batch()[1]
    for batch in (streamed, mixture):
        assert sorted(batch) == sorted(expected)
        for key, value in batch.items():
            assert value.dtype == mixture[key].dtype and value.shape == mixture[key].shape
    for key in expected:
        np.testing.assert_array_equal(streamed[key].numpy(), expected[key])


# ---------------------------------------------------------------------------- a streamed run


def stream_flags(out, small_corpus, *extra: str) -> list[str]:
    train_file, eval_file = small_corpus
    data = ["--train-text", str(train_file), "--eval-text", str(eval_file), "--streaming"]
    run = ["--max-steps", str(STEPS), "--log-every", "1", "--output-dir", str(out)]
    return TINY_FLAGS + data + run + list(extra)


@pytest.fixture(scope="module")
def straight_streamed(tmp_path_factory, small_corpus):
    out = tmp_path_factory.mktemp("streamed") / "straight"
    train.train(train.config_from_args(stream_flags(out, small_corpus, "--dropout", "0.1")))
    return out


@pytest.mark.parametrize("stop_at", [6, 11])  # 11: the second pass has begun
def test_streamed_run_stopped_and_resumed_equals_uninterrupted(
    tmp_path, small_corpus, straight_streamed, stop_at
):
    out = tmp_path / "stopped"
    cfg = train.config_from_args(stream_flags(out, small_corpus, "--dropout", "0.1"))
    with pytest.raises(Stopped):
        train.train(cfg, make_loader=interrupting(StreamingLoader, stop_at, cfg))
    assert latest_step(out) == stop_at
    train.train(train.config_from_args(["--resume", str(out)]))
    assert latest_step(out) == STEPS
    assert [m["step"] for m in metrics(out) if "lr" in m] == list(range(1, STEPS + 1))
    assert_same_run(straight_streamed, out)


def test_a_streamed_run_resumes_only_streamed(tmp_path, straight_streamed):
    """A streamed data position means nothing to the mapped loader, and the reverse."""
    out = tmp_path / "copy"
    shutil.copytree(straight_streamed, out)
    argv = ["--resume", str(out), "--no-streaming", "--max-steps", str(STEPS + 2)]
    with pytest.raises(ValueError, match="resume it with --streaming"):
        train.train(train.config_from_args(argv))


def test_streamed_run_trains_its_tokenizer_from_the_stream(tmp_path, corpus_files):
    """No --tokenizer: one is trained from the stream's first documents; the run trains and
    records --streaming in config.json's training options."""
    import json

    text_file, _ = corpus_files
    out = tmp_path / "run"
    flags = TINY_FLAGS + ["--train-text", str(text_file), "--streaming", "--max-steps", "3"]
    train.train(train.config_from_args(flags + ["--output-dir", str(out)]))
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["data"]["streaming"] is True
    assert (out / "tokenizer.json").is_file()
    assert [m["step"] for m in metrics(out) if "lr" in m] == [3]


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--objectives", "masked_lm=1,gap_summary=1"], "trains masked_lm only, not gap_summary"),
        (["--objectives", "summarize=1"], "trains masked_lm only, not summarize"),
        (["--train-pairs", "pairs.jsonl"], "--train-pairs"),
    ],
)
def test_unsupported_streaming_combinations_are_refused_before_reading(tmp_path, flags, message):
    # The text source does not exist: the refusal must come before anything is read.
    missing = str(tmp_path / "no-such-file.txt")
    base = TINY_FLAGS + ["--train-text", missing, "--streaming", "--output-dir", str(tmp_path)]
    with pytest.raises(TrainingError, match=message):
        train.train(train.config_from_args(base + flags))


def test_streaming_needs_text_sources(tmp_path):
    argv = TINY_FLAGS + ["--streaming", "--output-dir", str(tmp_path / "x")]
    with pytest.raises(TrainingError, match="--streaming streams --train-text"):
        train.train(train.config_from_args(argv))


def test_a_stream_with_nothing_after_the_held_out_documents_is_named(tmp_path, texts):
    text_file, _ = write_corpus(tmp_path / "c", texts[:20])
    argv = TINY_FLAGS + ["--train-text", str(text_file), "--streaming", "--max-steps", "2"]
    with pytest.raises(SystemExit, match=f"after the first {HELD_OUT_DOCS}, held out"):
        train.main(argv + ["--output-dir", str(tmp_path / "x"), "--vocab-size", "300"])


def test_a_streamed_position_saved_by_two_processes_is_refused_by_one(small_corpus, tokenizer):
    """Each process holds its own place in the stream: a state with two of them (a two-process
    run's) cannot be resumed by one process, and says so."""
    train_file, eval_file = small_corpus
    cfg = DataConfig(train_text=[str(train_file)], eval_text=[str(eval_file)], streaming=True)
    loader = StreamingLoader({"masked_lm": packed(cfg, tokenizer)}, {"masked_lm": 1.0}, 8, seed=3)
    state = loader.state_dict()
    assert "ranks" not in state  # one process: nothing to gather
    with pytest.raises(ValueError, match="saved by 2 process.*resume it with 2"):
        loader.load_state_dict({**state, "ranks": [state["stream"], state["stream"]]})
