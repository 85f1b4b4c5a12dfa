"""From tokenized examples to batches: per-objective streams, a weighted mixture, sharding
across processes, and a data position that resumes in O(1).

Every random choice is a pure function of (seed, position):

* which objective the n-th micro-batch belongs to: ``rng(seed, n)``;
* the order of an objective's examples in epoch e: ``rng(seed, objective, e)``;
* the masking of the g-th example drawn from an objective: ``rng(seed, objective, g)``.

So the position (micro-batches drawn, examples consumed per objective) is the whole state:
resuming never replays data, and the g-th example is the same whatever the number of
processes, which makes N-process training see exactly what one process would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from data.objectives import is_objective, objective_index, ordered
from data.objectives.masked_lm import MaskingConfig, block, mask_sequence, pack_blocks
from data.objectives.summarize import (
    PAD_MULTIPLE,
    build_example,
    collate,
    first_fit,
    pack,
    packed_length,
    padded_length,
)
from data.store import Ragged
from data.vocab import layout_ids, word_start_table
from model.constants import round_up
from model.tokenizer import SpecialIds, special_ids, task_ids

_MIXTURE, _ORDER, _SAMPLE = 0, 1, 2

# Why an objective's stream can come out empty.
_TOO_LITTLE = {
    "masked_lm": "the training text holds fewer tokens than one block of --seq-len",
    "gap_summary": "no training document has the two or more sentences gap sentences need",
    "summarize": "no training document/summary pairs",
}
_TOO_LITTLE_TASK = "no training pairs in its --train-pairs source"


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


# ---------------------------------------------------------------------------- streams


class MaskedLMStream:
    """Fixed-length blocks of packed text with dynamic masking; bidirectional attention."""

    name = "masked_lm"

    def __init__(
        self,
        flat: np.ndarray,
        seq_len: int,
        ids: SpecialIds,
        masking: MaskingConfig,
        *,
        word_start: np.ndarray | None,
        vocab_size: int,
        layout: np.ndarray | None = None,
        tasks: list[int] | None = None,
    ) -> None:
        """``layout``: token ids never masked besides the special tokens (whitespace-only
        tokens, :func:`~data.vocab.layout_ids`); ``tasks``: the task tokens' ids, special
        too (never masked, never a random replacement)."""
        self.flat, self.seq_len, self.ids, self.masking = flat, seq_len, ids, masking
        self.word_start = word_start
        special = np.array(sorted(set(ids.as_list()) | set(tasks or ())), dtype=np.int64)
        self.random_pool = np.setdiff1d(np.arange(vocab_size), special)
        self.never_masked = np.union1d(special, layout if layout is not None else [])
        self.size = pack_blocks(flat, seq_len)

    @classmethod
    def from_tokenizer(
        cls, flat: np.ndarray, seq_len: int, tokenizer, masking: MaskingConfig
    ) -> MaskedLMStream:
        """Blocks of ``flat`` masked with ``tokenizer``'s special ids, word starts and layout."""
        return cls(
            flat,
            seq_len,
            special_ids(tokenizer),
            masking,
            word_start=word_start_table(tokenizer),
            vocab_size=len(tokenizer),
            layout=layout_ids(tokenizer),
            tasks=list(task_ids(tokenizer).values()),
        )

    def over(self, flat: np.ndarray) -> MaskedLMStream:
        """The same masking (its tables built once) over other text, e.g. the held-out split."""
        other = copy.copy(self)
        other.flat, other.size = flat, pack_blocks(flat, self.seq_len)
        return other

    def __len__(self) -> int:
        return self.size

    def lengths(self) -> None:
        return None

    @property
    def num_tokens(self) -> int:
        return self.size * self.seq_len

    def batch(self, indices: np.ndarray, keys: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        blocks = [block(self.flat, int(index), self.seq_len, self.ids.cls) for index in indices]
        return self.masked(blocks, keys, seed)

    def masked(self, blocks: list, keys: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """The batch of whole blocks ([CLS] + ``seq_len - 1`` tokens), each masked by its sample
        key (also what :mod:`data.streaming` masks its packed blocks with)."""
        inputs, labels = [], []
        obj = objective_index(self.name)
        for ids, key in zip(blocks, keys, strict=True):
            x, y = self.mask(ids, _rng(seed, _SAMPLE, obj, key))
            inputs.append(x)
            labels.append(y)
        return {"input_ids": np.stack(inputs), "labels": np.stack(labels)}

    def mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of one token sequence masked with this stream's tables."""
        return mask_sequence(
            ids,
            rng,
            self.masking,
            mask_id=self.ids.mask,
            never_masked=self.never_masked,
            random_pool=self.random_pool,
            word_start=self.word_start,
        )


class Seq2SeqStream:
    """(source, target) token-id pairs; prefix-LM attention.

    ``sources`` and ``targets`` are :class:`~data.store.Ragged` (flat token files and
    offsets, read from the cache) or lists of token-id arrays, which are packed into one.

    ``source_masker`` (a :class:`MaskedLMStream`, for its tables and masking) also masks each
    source, as masked LM would, and labels the masked positions with their tokens: the same
    step then learns both to fill the source's gaps and to summarize it (as UniLM's and
    PEGASUS's sources carry masked words). Each example is masked by its sample key.

    ``task_id``: a named task's token, put in front of every source (never masked).

    ``pack``: batches put several examples in a row (``data.objectives.summarize.pack``), and
    an epoch's order is not sorted by length (examples of mixed lengths pack tightest).
    """

    def __init__(
        self,
        name: str,
        sources: Ragged | list,
        targets: Ragged | list,
        ids: SpecialIds,
        *,
        source_len: int,
        target_len: int,
        pad_multiple: int = PAD_MULTIPLE,
        source_masker: MaskedLMStream | None = None,
        task_id: int | None = None,
        pack: bool = False,
    ) -> None:
        self.name = name
        self.pack = pack
        self.source_masker = source_masker
        self.task_id = task_id
        head = 1 if task_id is None else 2  # [CLS], and the task's token
        if not isinstance(sources, Ragged):
            sources = Ragged.from_list(sources)
        if not isinstance(targets, Ragged):
            targets = Ragged.from_list(targets)
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        self.sources, self.targets, self.ids = sources, targets, ids
        self.source_len, self.target_len = source_len, target_len
        self.pad_multiple = pad_multiple
        self._lengths = (
            np.minimum(sources.lengths(), source_len - 1 - head)
            + 1
            + head
            + np.minimum(targets.lengths(), target_len - 1)
        ).astype(np.int64)

    def __len__(self) -> int:
        return len(self.sources)

    def lengths(self) -> np.ndarray | None:
        """Each example's length, for batches of similar lengths; None when packing."""
        return None if self.pack else self._lengths

    @property
    def num_tokens(self) -> int:
        return int(self._lengths.sum())

    def packing_saves(self, batch_size: int, batches: int = 64) -> float:
        """The share of its batches' positions that packing saves this stream: the first
        ``batches`` batches of ``batch_size`` of an epoch padded (similar lengths together, as
        ``epoch_order`` puts them) against as many packed (drawn at random)."""
        lengths, n = self._lengths, len(self._lengths)
        size = min(batch_size, n)
        if size == 0:
            return 0.0
        count = max(1, min(batches, n // size))
        limit = self.source_len + self.target_len
        padded_order = epoch_order(n, 0, 0, 0, lengths, size)
        random_order = epoch_order(n, 0, 0, 0, None, size)
        padded = packed = 0
        for k in range(count):
            batch = slice(k * size, (k + 1) * size)
            sizes = lengths[padded_order[batch]]
            padded += len(sizes) * padded_length(sizes, self.pad_multiple, limit)
            sizes = lengths[random_order[batch]]
            length = packed_length(sizes, self.pad_multiple, limit)
            packed += len(first_fit(sizes, length)) * length
        return 1 - packed / padded

    def example(self, index: int):
        return build_example(
            self.sources[index],
            self.targets[index],
            cls_id=self.ids.cls,
            sep_id=self.ids.sep,
            source_len=self.source_len,
            target_len=self.target_len,
            task_id=self.task_id,
        )

    def batch(self, indices: np.ndarray, keys: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        examples = [self.example(int(i)) for i in indices]
        if self.source_masker is not None:
            obj = objective_index(self.name)
            start = 1 if self.task_id is None else 2
            for (ids, labels, prefix), key in zip(examples, keys, strict=True):
                # Between [CLS] (and the task's token) and [SEP]; labels there were IGNORE_INDEX.
                source = slice(start, prefix - 1)
                ids[source], labels[source] = self.source_masker.mask(
                    ids[source], _rng(seed, _SAMPLE, obj, key)
                )
        return (pack if self.pack else collate)(
            examples,
            self.ids.pad,
            multiple=self.pad_multiple,
            limit=self.source_len + self.target_len,
        )


def pieces_for(batch: dict[str, torch.Tensor], max_tokens: int) -> int:
    """How many pieces ``batch`` runs as so that none holds more than ``max_tokens`` positions
    (rows x length): the rows are halved until a piece fits (a power of two, so the set of
    piece shapes stays small), down to one row each. ``max_tokens`` 0: one, the batch whole."""
    rows, length = batch["input_ids"].shape
    pieces = 1
    while max_tokens and pieces < rows and rows * length > max_tokens * pieces:
        pieces *= 2
    return min(pieces, rows)


def split_batch(batch: dict[str, torch.Tensor], pieces: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` as ``pieces`` pieces of consecutive rows, for memory. A right-padded piece (one
    with an ``attention_mask``) is cut to its own longest row, rounded up to PAD_MULTIPLE.
    Every labelled token is in exactly one piece, so the sum of the pieces' summed losses is
    the batch's: training on the pieces gives the batch's gradient."""
    rows, length = batch["input_ids"].shape
    pieces = min(pieces, rows)
    if pieces <= 1:
        return [batch]
    out = []
    for i in range(pieces):
        piece = {k: v.tensor_split(pieces)[i] for k, v in batch.items()}
        mask = piece.get("attention_mask")
        if mask is not None:
            longest = int(mask.sum(1).max())
            keep = min(length, max(round_up(longest, PAD_MULTIPLE), longest))
            piece = {k: v[:, :keep] if v.dim() == 2 else v for k, v in piece.items()}
        out.append(piece)
    return out


# ---------------------------------------------------------------------------- ordering


def epoch_order(n: int, seed: int, objective: int, epoch: int, lengths, bucket: int) -> np.ndarray:
    """The order of an objective's examples in one epoch.

    With lengths (sequence-to-sequence data), examples are sorted by length inside windows of
    ``bucket`` examples and the resulting batches-worth are shuffled again, so a batch holds
    examples of similar length (less padding) while the epoch stays random.
    """
    rng = _rng(seed, _ORDER, objective, epoch)
    # int32 (the same shuffle as of an int64 range): the one array that grows with the corpus,
    # 4 bytes per example or masked-LM block.
    order = rng.permutation(np.arange(n, dtype=np.int32 if n < 2**31 else np.int64))
    if lengths is None or bucket <= 1:
        return order
    window = bucket * 64
    for start in range(0, n, window):
        chunk = order[start : start + window]
        order[start : start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    # Whole batches-worth move; the short remainder stays last, or every batch after it would
    # straddle two length groups.
    whole = n - n % bucket
    groups = [order[i : i + bucket] for i in range(0, whole, bucket)]
    rng.shuffle(groups)
    return np.concatenate([*groups, order[whole:]])


@dataclass
class DataPosition:
    """Where the mixture stands: micro-batches drawn, and examples consumed per objective
    (across all processes). Plain integers, saved as JSON with every checkpoint."""

    batches: int = 0
    consumed: dict[str, int] | None = None

    def to_dict(self) -> dict:
        return {"batches": self.batches, "consumed": dict(self.consumed or {})}

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        return cls(
            batches=int(d["batches"]), consumed={k: int(v) for k, v in d["consumed"].items()}
        )


class Loader:
    """What every loader shares: the batch size, the seed, this process's slice of each global
    batch (``rank`` of ``world_size``), the objectives it draws (:meth:`choose`, which refuses
    weights or streams it cannot serve) and the data position."""

    def __init__(
        self,
        streams: dict,
        weights: dict[str, float],
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.names = self.choose(streams, weights)
        self.streams, self.batch_size, self.seed = streams, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.position = DataPosition(0, {n: 0 for n in self.names})

    def choose(self, streams: dict, weights: dict[str, float]) -> list[str]:
        raise NotImplementedError

    def sample_keys(self, start: int) -> np.ndarray:
        """This rank's sample keys in the global batch whose first key is ``start``."""
        return np.arange(start, start + self.batch_size) + self.rank * self.batch_size

    def advance(self, name: str, start: int) -> None:
        """Count one micro-batch drawn, and a global batch of ``name`` consumed from ``start``."""
        self.position.batches += 1
        self.position.consumed[name] = start + self.batch_size * self.world_size


class MixtureLoader(Loader):
    """Endless micro-batches; each belongs to one objective, picked with the given weights.

    ``rank`` / ``world_size`` shard every global batch (``batch_size * world_size`` examples)
    without overlap: rank r takes the r-th slice. All ranks pick the same objective at the
    same step, so the mixture holds globally.
    """

    def choose(self, streams: dict, weights: dict[str, float]) -> list[str]:
        unknown = [name for name in weights if not is_objective(name)]
        if unknown:
            raise ValueError(
                f"unknown objective(s) {', '.join(unknown)}; expected masked_lm, gap_summary, "
                "summarize or a task name of --train-pairs"
            )
        for name, w in weights.items():
            if not (np.isfinite(w) and w >= 0):
                raise ValueError(f"objective weight must be a finite number >= 0, got {name}={w}")
        names = ordered(n for n, w in weights.items() if w > 0)
        if not names:
            raise ValueError("at least one objective needs a weight > 0")
        # An objective weighted 0 is switched off and needs no data.
        missing = [name for name in names if name not in streams]
        if missing:
            raise ValueError(f"no data for objective(s) {', '.join(missing)}")
        for name in names:
            if len(streams[name]) == 0:
                why = _TOO_LITTLE.get(name, _TOO_LITTLE_TASK)
                raise ValueError(f"objective {name} has no training examples ({why})")
        total = sum(weights[n] for n in names)
        self.probs = np.array([weights[n] / total for n in names])
        self._orders: dict[tuple[str, int], np.ndarray] = {}
        return names

    def local_state(self) -> dict:
        """This process's position now, as a copy: no collectives, so a prefetching thread
        (:mod:`data.prefetch`) may take it after each batch it draws."""
        return self.position.to_dict()

    def state_dict(self, local: dict | None = None) -> dict:
        """The position to save: ``local`` (a :meth:`local_state` taken earlier) or now's."""
        return local if local is not None else self.local_state()

    def load_state_dict(self, state: dict) -> None:
        if "stream" in state:
            raise ValueError(
                "the checkpoint's data position is a streamed one (the run was trained with "
                "--streaming); resume it with --streaming"
            )
        pos = DataPosition.from_dict(state)
        for name in self.names:
            pos.consumed.setdefault(name, 0)
        self.position = pos

    def objective_at(self, batch_index: int) -> str:
        u = _rng(self.seed, _MIXTURE, batch_index).random()
        return self.names[
            min(int(np.searchsorted(np.cumsum(self.probs), u, side="right")), len(self.names) - 1)
        ]

    def _order(self, name: str, epoch: int) -> np.ndarray:
        key = (name, epoch)
        if key not in self._orders:
            stream = self.streams[name]
            if len(self._orders) > 8:
                self._orders.clear()
            self._orders[key] = epoch_order(
                len(stream),
                self.seed,
                objective_index(name),
                epoch,
                stream.lengths(),
                self.batch_size * self.world_size,
            )
        return self._orders[key]

    def examples_for(self, name: str, start: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's example indices and sample keys for the global batch starting at ``start``."""
        n = len(self.streams[name])
        keys = self.sample_keys(start)
        indices = np.array([self._order(name, int(k // n))[int(k % n)] for k in keys])
        return indices, keys

    def next_batch(self) -> tuple[str, dict[str, torch.Tensor]]:
        name = self.objective_at(self.position.batches)
        start = self.position.consumed[name]
        indices, keys = self.examples_for(name, start)
        batch = self.streams[name].batch(indices, keys, self.seed)
        self.advance(name, start)
        return name, {k: torch.from_numpy(v) for k, v in batch.items()}
