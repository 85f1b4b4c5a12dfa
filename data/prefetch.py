"""Batches drawn ahead on a background thread, so that a step does not wait for its data.

``Prefetcher`` wraps a loader (:class:`~data.batching.MixtureLoader` or
:class:`~data.streaming.StreamingLoader`). A daemon thread calls the loader's ``next_batch`` up
to ``depth`` batches ahead of the step and, after each, takes the loader's ``local_state()``
(a copy, with no collectives), so a checkpoint saves the position after the last batch the step
took, not after the last one the thread drew. Every batch is keyed by its position (order,
masking and gap choices come from seeded keys, not from a shared random state), so a run draws
the same batches with or without prefetching, and resumes exactly from either.

A failure in the thread (a bad record, a stream with no documents) is raised again by the
``next_batch`` that would have returned the batch. With ``pin_memory`` (CUDA) the thread also
pins each batch, so its copy to the device (``non_blocking``) overlaps the step.
"""

from __future__ import annotations

import queue
import threading
import time

_POLL = 0.1  # seconds between checks of the stop flag while the queue is full or empty


class Prefetcher:
    def __init__(self, loader, depth: int, *, pin_memory: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.loader, self.depth, self.pin_memory = loader, depth, pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumed: dict | None = None  # the loader's local state after the last batch taken
        self._error: BaseException | None = None

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("a prefetching loader's state is loaded before its first batch")
        self.loader.load_state_dict(state)

    def state_dict(self) -> dict:
        """The position after the last batch ``next_batch`` returned (every rank calls it: a
        streamed loader gathers the ranks' places)."""
        return self.loader.state_dict(self._consumed)

    def next_batch(self):
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="prefetch", daemon=True)
            self._thread.start()
        while True:
            try:
                item, state, error = self._queue.get(timeout=_POLL)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the data-loading thread ended without a batch") from None
        if error is not None:
            self._error = error
            raise error
        self._consumed = state
        return item

    def close(self, wait: float = 10.0) -> None:
        """Stop the thread: it finishes the batch it is drawing, waited for up to ``wait``
        seconds (a daemon thread still reading then ends with the process)."""
        self._stop.set()
        deadline = time.monotonic() + wait
        if self._thread is not None:
            while self._thread.is_alive() and time.monotonic() < deadline:
                try:
                    self._queue.get_nowait()  # room for a put the thread may be waiting on
                except queue.Empty:
                    pass
                self._thread.join(timeout=_POLL)

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                name, batch = self.loader.next_batch()
                if self.pin_memory:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                if not self._put(((name, batch), self.loader.local_state(), None)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((None, None, error))

    def _put(self, entry: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False
