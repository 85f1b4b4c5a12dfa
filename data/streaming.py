"""``--streaming``: training text read as a ``datasets.IterableDataset`` and packed into
masked-LM blocks on the fly, for corpora larger than the disk the prepared path would need.

* The documents are read by :func:`data.sources.iter_texts` (the same decoders, document
  splitting and error messages as the prepared path), one ``--train-text`` source per shard
  of an ``IterableDataset.from_generator``, split across processes with
  ``datasets.distributed.split_dataset_by_node``. Hub datasets are read with
  ``load_dataset(..., streaming=True)``. The order is the sources' own (no shuffle buffer:
  its contents would be lost on resume); every pass reads them in the same order.
* Held-out text is ``--eval-text`` when given (prepared like the mapped path's), else the first
  :data:`HELD_OUT_DOCS` documents of the stream (of the first source), which the training
  stream skips.
* Each document's tokens, followed by ``[SEP]``, go into a packing buffer that is cut into
  blocks of ``seq_len - 1`` tokens (``[CLS]`` makes ``seq_len``): the blocks the prepared path
  cuts from its flat token array, in reading order. Masking is
  :meth:`data.batching.MaskedLMStream.masked`, keyed by the block's global sample index, so a
  streamed batch has the mapped batch's keys, dtypes and shapes.
* :class:`StreamingLoader` has :class:`~data.batching.MixtureLoader`'s interface. Its state is
  the data position, the ``IterableDataset``'s ``state_dict()`` (shard and example within it)
  and the buffer's leftover tokens, so a resumed run neither replays nor skips a document. A
  resumed reader skips to its example by reading the current source from its start (without
  tokenizing); several smaller sources make that shorter.

Only masked LM is streamed: gap sentences and document/summary pairs stay on the prepared path,
and :func:`data.config.check_objectives` refuses them before any data is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

import numpy as np
import torch

from data.batching import DataPosition, Loader, MaskedLMStream
from data.config import DataConfig, check_objectives
from data.objectives.masked_lm import MaskingConfig, block
from data.pipeline import Streams, encode_texts, tokenize_texts
from data.raw import RawData, iter_source, prepare_split
from data.store import digest
from data.vocab import SAMPLE_CHARS

# Documents held out from the start of the stream when no --eval-text is given.
HELD_OUT_DOCS = 256


# ---------------------------------------------------------------------------- documents


def _documents(shards: list, cfg: DataConfig, held_out: int) -> Iterator[dict]:
    """The documents of ``shards`` ((index, source) pairs), as ``{"text": ...}`` rows; the first
    ``held_out`` documents of source 0 are skipped (they are the held-out text)."""
    for index, source in shards:
        docs = iter_source("texts", source, cfg, streaming=True)
        if index == 0 and held_out:
            docs = islice(docs, held_out, None)
        for doc in docs:
            yield {"text": doc}


def text_dataset(cfg: DataConfig, *, rank: int = 0, world_size: int = 1):
    """The training documents as an ``IterableDataset`` (one shard per source), this process's
    part of them."""
    from datasets import Features, IterableDataset, Value
    from datasets.distributed import split_dataset_by_node

    dataset = IterableDataset.from_generator(
        _documents,
        features=Features({"text": Value("string")}),
        gen_kwargs={
            "shards": list(enumerate(cfg.train_text)),
            "cfg": cfg,
            "held_out": _held_out(cfg),
        },
    )
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


def held_out_texts(cfg: DataConfig):
    """--eval-text as a prepared table, else the first :data:`HELD_OUT_DOCS` documents of the
    first source (a list)."""
    if cfg.eval_text:
        return prepare_split("texts", [], cfg.eval_text, cfg)[1]
    return list(islice(iter_source("texts", cfg.train_text[0], cfg, streaming=True), HELD_OUT_DOCS))


def tokenizer_sample(cfg: DataConfig, max_chars: int = SAMPLE_CHARS) -> Iterator[str]:
    """The training stream's first documents, up to about ``max_chars`` characters: the
    deterministic sample a tokenizer trains on (the held-out documents are not in it)."""
    chars = 0
    rows = _documents(list(enumerate(cfg.train_text)), cfg, _held_out(cfg))
    for row in rows:
        yield row["text"]
        chars += len(row["text"])
        if chars >= max_chars:
            return


def _held_out(cfg: DataConfig) -> int:
    return 0 if cfg.eval_text else HELD_OUT_DOCS


def load_streamed(cfg: DataConfig) -> RawData:
    """What the run holds of its data: the held-out text only (training text is streamed)."""
    held = held_out_texts(cfg)
    where = "--eval-text" if cfg.eval_text else f"the first documents of {cfg.train_text[0]}"
    desc = f"{', '.join(cfg.train_text)}: streamed; held out {len(held)} texts ({where})"
    return RawData([], held, [], [], desc)


# ---------------------------------------------------------------------------- packing


class PackedText:
    """Masked-LM blocks packed on the fly from a stream of documents.

    ``make_dataset`` builds this process's ``IterableDataset`` afresh (for a new pass, or to
    load a saved state into). The state is the pass, the dataset's ``state_dict()`` and the
    packing buffer's leftover tokens.
    """

    name = "masked_lm"

    def __init__(
        self,
        make_dataset: Callable,
        tokenizer,
        seq_len: int,
        masking: MaskingConfig,
        *,
        held_out: int = 0,
    ) -> None:
        self.make_dataset, self.tokenizer, self.seq_len = make_dataset, tokenizer, seq_len
        self.held_out = held_out
        # The mapped stream's masking (and its tables), applied to blocks this class packs.
        self.masker = MaskedLMStream.from_tokenizer(
            np.zeros(0, dtype=np.int32), seq_len, tokenizer, masking
        )
        self.cls, self.sep = self.masker.ids.cls, self.masker.ids.sep
        self.epoch = 0
        self.buffer = np.zeros(0, dtype=np.int32)
        self._dataset = None
        self._rows = None
        self._saved: dict | None = None  # a loaded dataset state, until reading starts

    def state_dict(self) -> dict:
        """A copy: the dataset's ``state_dict()`` is one, and the buffer is listed."""
        dataset = self._dataset.state_dict() if self._dataset is not None else self._saved
        return {"epoch": self.epoch, "dataset": dataset, "buffer": self.buffer.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.buffer = np.asarray(state["buffer"], dtype=np.int32)
        self._saved, self._dataset, self._rows = state["dataset"], None, None

    def _open(self) -> None:
        dataset = self.make_dataset()
        dataset.set_epoch(self.epoch)
        if self._saved is not None:
            dataset.load_state_dict(self._saved)
            self._saved = None
        self._dataset, self._rows = dataset, iter(dataset)

    def _next_text(self) -> str:
        # Two tries: a state saved at the very end of a pass opens onto nothing; only a fresh
        # pass that yields nothing means there is no training text.
        for _ in range(2):
            if self._rows is None:
                self._open()
            try:
                return next(self._rows)["text"]
            except StopIteration:
                self.epoch += 1
                self._dataset = self._rows = None
        after = (
            f" after the first {self.held_out}, held out for evaluation" if self.held_out else ""
        )
        raise ValueError(
            f"--streaming: the training stream holds no documents{after}; give more text"
            + (" or --eval-text" if self.held_out else "")
        )

    def next_blocks(self, count: int) -> list[np.ndarray]:
        """The next ``count`` blocks ([CLS] + ``seq_len - 1`` tokens each), int64."""
        body = self.seq_len - 1
        need = count * body
        pieces, have = [self.buffer], len(self.buffer)
        while have < need:
            (ids,) = encode_texts(self.tokenizer, [self._next_text()])
            piece = np.asarray(ids + [self.sep], dtype=np.int32)
            pieces.append(piece)
            have += len(piece)
        flat = np.concatenate(pieces)
        self.buffer = flat[need:].copy()
        return [block(flat, i, self.seq_len, self.cls) for i in range(count)]


class StreamedStreams(Streams):
    def describe(self) -> str:
        held = len(self.eval.get("masked_lm", []))
        return f"masked_lm: streamed train / {held:,} held-out examples"


def build_streamed(
    raw: RawData, make_dataset: Callable, tokenizer, cfg: DataConfig, seq_len: int
) -> StreamedStreams:
    """The streamed training blocks and the held-out ones (a prepared masked-LM stream)."""
    masking = cfg.masking()
    train = PackedText(make_dataset, tokenizer, seq_len, masking, held_out=_held_out(cfg))
    tok_key = digest(tokenizer.backend_tokenizer.to_str())
    flat = tokenize_texts(raw.eval_texts, tokenizer, "text-eval", tok_key)
    held = train.masker.over(flat)
    return StreamedStreams({"masked_lm": train}, {"masked_lm": held})


# ---------------------------------------------------------------------------- the loader


def _launched() -> bool:
    """Several processes under torch.distributed (torchrun), each with its own stream."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class StreamingLoader(Loader):
    """:class:`~data.batching.MixtureLoader`'s interface over streamed masked-LM blocks.

    Each process packs its own part of the stream; the g-th block a process draws in its k-th
    micro-batch is masked with the sample key ``consumed + rank * batch_size + g``, as the
    mixture loader keys its examples.
    """

    def choose(self, streams: dict, weights: dict[str, float]) -> list[str]:
        check_objectives(weights)
        if "masked_lm" not in streams:
            raise ValueError("no data for objective masked_lm")
        self.stream: PackedText = streams["masked_lm"]
        return ["masked_lm"]

    def local_state(self) -> dict:
        """This process's position and place in the stream now, as a copy: no collectives, so
        a prefetching thread (:mod:`data.prefetch`) may take it after each batch it draws."""
        return {**self.position.to_dict(), "stream": self.stream.state_dict()}

    def state_dict(self, local: dict | None = None) -> dict:
        """The data position to save (``local``, a :meth:`local_state` taken earlier, or now's),
        with every process's place in the stream (``ranks``): each reads its own part, so under
        torchrun this gathers them, and every rank must call it."""
        state = dict(local if local is not None else self.local_state())
        if _launched():
            state["ranks"] = [None] * self.world_size
            torch.distributed.all_gather_object(state["ranks"], state["stream"])
        return state

    def load_state_dict(self, state: dict) -> None:
        if "stream" not in state:
            raise ValueError(
                "the checkpoint's data position is not a streamed one (the run was trained "
                "without --streaming); resume it without --streaming"
            )
        saved_by = len(state.get("ranks", [None]))
        if saved_by != (self.world_size if _launched() else 1):
            raise ValueError(
                f"this streamed run was saved by {saved_by} process(es) and is resumed by "
                f"{self.world_size}: each process holds its own place in the stream, so resume "
                f"it with {saved_by}"
            )
        self.position = DataPosition.from_dict(state)
        self.position.consumed.setdefault("masked_lm", 0)
        self.stream.load_state_dict(
            state["ranks"][self.rank] if "ranks" in state else state["stream"]
        )

    def next_batch(self) -> tuple[str, dict[str, torch.Tensor]]:
        start = self.position.consumed["masked_lm"]
        keys = self.sample_keys(start)
        blocks = self.stream.next_blocks(self.batch_size)
        batch = self.stream.masker.masked(blocks, keys, self.seed)
        self.advance("masked_lm", start)
        return "masked_lm", {k: torch.from_numpy(v) for k, v in batch.items()}
