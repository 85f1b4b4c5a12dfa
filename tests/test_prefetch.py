"""Batches drawn ahead on a thread (--prefetch): the same run as without, resumable exactly from
a checkpoint taken while the thread is ahead, and the thread's failures raised to the caller."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from conftest import TINY_FLAGS, latest_step, metrics, write_corpus
from fault_runner import assert_same_run
from test_resume import STEPS, flags, run_to_end
from test_streaming import stream_flags

import train
import trainer.prepare
from data.prefetch import Prefetcher
from data.streaming import HELD_OUT_DOCS
from trainer.loop import Stopped
from trainer.prepare import prefetch_depth

pytestmark = pytest.mark.usefixtures("without_plot")

MIX = ["--dropout", "0.1", "--grad-accum", "2"]


def stopping_prefetcher(stop_at: int, grad_accum: int) -> type:
    """A prefetcher that raises SIGTERM when the step takes step ``stop_at``'s first micro-batch:
    the thread is then up to its depth ahead, and the checkpoint must not count those."""
    first_micro_batch = (stop_at - 1) * grad_accum

    class Stopping(Prefetcher):
        taken = 0

        def next_batch(self):
            if self.taken == first_micro_batch:
                if self._thread is not None:  # let the thread run ahead, as a slow step would
                    wait_until(lambda: self._queue.full())
                signal.raise_signal(signal.SIGTERM)
            self.taken += 1
            return super().next_batch()

    return Stopping


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus_files):
    """The run without prefetching, trained once."""
    out = tmp_path_factory.mktemp("prefetch") / "straight"
    run_to_end(flags(out, corpus_files, *MIX, "--prefetch", "0"))
    return out


def test_a_prefetched_run_is_the_same_run(tmp_path, corpus_files, straight):
    out = tmp_path / "prefetched"
    run_to_end(flags(out, corpus_files, *MIX, "--prefetch", "3"))
    assert_same_run(straight, out)


@pytest.mark.parametrize("stop_at", [1, 6])
def test_a_prefetched_run_stopped_ahead_resumes_exactly(
    tmp_path, corpus_files, straight, monkeypatch, stop_at
):
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(trainer.prepare, "Prefetcher", stopping_prefetcher(stop_at, grad_accum=2))
        with pytest.raises(Stopped):
            run_to_end(flags(out, corpus_files, *MIX, "--prefetch", "4"))
    assert latest_step(out) == stop_at
    run_to_end(["--resume", str(out), "--prefetch", "2"])
    assert latest_step(out) == STEPS
    assert [m["step"] for m in metrics(out) if "lr" in m] == list(range(1, STEPS + 1))
    assert_same_run(straight, out)


def test_a_prefetched_streamed_run_stopped_ahead_resumes_exactly(
    tmp_path,
    small_corpus,
    monkeypatch,
):
    straight_out = tmp_path / "straight"
    run_to_end(stream_flags(straight_out, small_corpus, "--prefetch", "0"))
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(trainer.prepare, "Prefetcher", stopping_prefetcher(7, grad_accum=1))
        with pytest.raises(Stopped):
            run_to_end(stream_flags(out, small_corpus, "--prefetch", "3"))
    assert latest_step(out) == 7
    run_to_end(["--resume", str(out), "--prefetch", "3"])
    assert_same_run(straight_out, out)


def test_a_failure_in_the_thread_reaches_the_step_with_its_message(tmp_path, texts):
    text_file, _ = write_corpus(tmp_path / "c", texts[:20])
    argv = TINY_FLAGS + ["--train-text", str(text_file), "--streaming", "--max-steps", "2"]
    argv += ["--output-dir", str(tmp_path / "x"), "--vocab-size", "300", "--prefetch", "2"]
    with pytest.raises(SystemExit, match=f"after the first {HELD_OUT_DOCS}, held out"):
        train.main(argv)


# ---------------------------------------------------------------------------- the prefetcher


class Counting:
    """A loader of numbered batches that fails at batch ``fail_at``."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.drawn, self.fail_at = 0, fail_at

    def next_batch(self):
        if self.drawn == self.fail_at:
            raise ValueError(f"bad record at batch {self.drawn}")
        self.drawn += 1
        return "masked_lm", {"n": self.drawn}

    def local_state(self) -> dict:
        return {"batches": self.drawn}

    def state_dict(self, local: dict | None = None) -> dict:
        return local if local is not None else self.local_state()

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["batches"]


def wait_until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_saved_position_is_the_last_batch_taken_not_the_last_drawn():
    loader = Counting()
    fetch = Prefetcher(loader, depth=3)
    assert fetch.state_dict() == {"batches": 0}
    assert [fetch.next_batch()[1]["n"] for _ in range(2)] == [1, 2]
    wait_until(lambda: fetch._queue.full())  # two taken, three waiting, one more drawn
    assert loader.drawn >= 2 + 3
    assert fetch.state_dict() == {"batches": 2}
    fetch.close()
    assert not fetch._thread.is_alive()


def test_a_loaded_position_is_where_the_thread_starts():
    fetch = Prefetcher(Counting(), depth=2)
    fetch.load_state_dict({"batches": 40})
    assert fetch.next_batch()[1]["n"] == 41
    with pytest.raises(RuntimeError, match="before its first batch"):
        fetch.load_state_dict({"batches": 0})
    fetch.close()


def test_the_thread_s_error_comes_after_the_good_batches_and_stays():
    fetch = Prefetcher(Counting(fail_at=2), depth=4)
    assert [fetch.next_batch()[1]["n"] for _ in range(2)] == [1, 2]
    for _ in range(2):
        with pytest.raises(ValueError, match="bad record at batch 2"):
            fetch.next_batch()
    assert fetch.state_dict() == {"batches": 2}
    fetch.close()


def test_close_stops_a_thread_waiting_on_a_full_queue():
    fetch = Prefetcher(Counting(), depth=1)
    fetch.next_batch()
    wait_until(lambda: fetch._queue.full())
    fetch.close()
    assert not fetch._thread.is_alive()


def test_prefetch_is_on_by_default_on_cuda_only():
    assert prefetch_depth(None, torch.device("cpu")) == 0
    assert prefetch_depth(None, torch.device("cuda", 0)) == 2
    assert prefetch_depth(3, torch.device("cpu")) == 3
    assert prefetch_depth(0, torch.device("cuda", 0)) == 0
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetcher(Counting(), depth=0)


def test_a_negative_prefetch_is_refused(tmp_path, corpus_files):
    with pytest.raises(SystemExit, match="--prefetch must be >= 0"):
        train.main(flags(tmp_path / "x", corpus_files, "--prefetch", "-1"))
