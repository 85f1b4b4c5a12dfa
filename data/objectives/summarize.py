"""Sequence-to-sequence examples for summarization (supervised pairs and gap sentences).

One sequence per example, read by the prefix-LM mask:

    [CLS] source... [SEP] t1 t2 ... tm        inputs
          (ignored)   t1 t2 t3 ... [SEP]      labels (shifted: each position predicts the next)

The prefix (``[CLS] source [SEP]``) sees itself in both directions; each target position
sees the prefix and the target before it. A named task's source starts with its token
(``[CLS] [TASK:title] source... [SEP]``), which counts in the source length. Sources longer than the limit are truncated at
the end; targets likewise (documented behaviour, counted by the caller).

Packed batches (``pack``) put several examples in one row, each with its own positions from 0
and its own prefix; the attention mask keeps every example to its own tokens (block-diagonal
prefix-LM), so a packed batch computes what the padded one does on fewer positions.
"""

from __future__ import annotations

import numpy as np

from model.constants import IGNORE_INDEX, round_up

# Sequence-to-sequence batches are padded to a multiple of this many positions (see collate):
# few distinct lengths keep the CPU's per-shape matrix kernels, and the memory each holds, few
# (default job, 300 steps: peak 1.8 GB at 64, 2.3 GB at 16; about the same speed).
PAD_MULTIPLE = 64


def build_example(
    source: list[int] | np.ndarray,
    target: list[int] | np.ndarray,
    *,
    cls_id: int,
    sep_id: int,
    source_len: int,
    target_len: int,
    task_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (input_ids, labels, prefix_length); total length <= source_len + target_len.
    ``task_id``: the token of a named task, in front of the source."""
    head = [cls_id] if task_id is None else [cls_id, task_id]
    src = np.asarray(source, dtype=np.int64)[: source_len - 1 - len(head)]
    tgt = np.asarray(target, dtype=np.int64)[: target_len - 1]
    prefix = np.concatenate([head, src, [sep_id]])
    inputs = np.concatenate([prefix, tgt])
    labels = np.full(len(inputs), IGNORE_INDEX, dtype=np.int64)
    labels[len(prefix) - 1 :] = np.concatenate([tgt, [sep_id]])
    return inputs, labels, len(prefix)


def padded_length(sizes, multiple: int = 1, limit: int | None = None) -> int:
    """The length a batch of examples of these ``sizes`` is padded to: the longest rounded up
    to ``multiple``, but not past ``limit`` (nor under the longest)."""
    longest = int(max(sizes))
    length = round_up(longest, multiple)
    return length if limit is None else max(min(length, limit), longest)


def packed_length(sizes, multiple: int = 1, limit: int | None = None) -> int:
    """The length of a packed batch's rows: ``limit``, or without one ``padded_length``."""
    return padded_length(sizes, multiple) if limit is None else max(limit, int(max(sizes)))


def first_fit(sizes, length: int) -> list[list[int]]:
    """The indices of ``sizes`` in rows of ``length``, by first-fit decreasing (longest first,
    each into the first row with room; ties in order)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        row = next((r for r, room in enumerate(free) if room >= sizes[i]), None)
        if row is None:
            rows.append([])
            free.append(length)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= sizes[i]
    return rows


def collate(
    examples: list[tuple[np.ndarray, np.ndarray, int]],
    pad_id: int,
    *,
    multiple: int = 1,
    limit: int | None = None,
) -> dict[str, np.ndarray]:
    """Right-pad a list of examples into arrays (input_ids, labels, attention_mask,
    prefix_lengths), to the longest example rounded up to ``multiple`` (but not past ``limit``).

    Rounding keeps the set of batch shapes small: CPU matrix kernels (oneDNN) are prepared per
    shape, and a batch of a never-seen length trains ~30% slower.
    """
    length = padded_length([len(e[0]) for e in examples], multiple, limit)
    b = len(examples)
    input_ids = np.full((b, length), pad_id, dtype=np.int64)
    labels = np.full((b, length), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((b, length), dtype=np.int64)
    prefix = np.zeros(b, dtype=np.int64)
    for i, (ids, lab, p) in enumerate(examples):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(lab)] = lab
        attention[i, : len(ids)] = 1
        prefix[i] = p
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention,
        "prefix_lengths": prefix,
    }


def pack(
    examples: list[tuple[np.ndarray, np.ndarray, int]],
    pad_id: int,
    *,
    multiple: int = 1,
    limit: int | None = None,
) -> dict[str, np.ndarray]:
    """The examples packed into as few rows as first-fit decreasing finds, each row ``limit``
    long (the longest an example can be; without a limit, as long as ``collate`` would pad the
    batch), with the arrays ``collate`` gives and two more:

    * ``position_ids``: each example's positions, from 0 at its [CLS];
    * ``segment_ids``: 1, 2, ... for the examples of a row, in order; 0 on padding;

    and ``prefix_lengths`` per token (rows, length): the prefix length of the token's example
    (0 on padding). The rows keep their examples in batch order; ties go to the earlier row.
    Rows of one length leave the row count the only size that varies from batch to batch:
    few shapes (CPU matrix kernels are prepared and kept per shape).
    """
    sizes = [len(e[0]) for e in examples]
    length = packed_length(sizes, multiple, limit)
    rows = first_fit(sizes, length)
    shape = (len(rows), length)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    attention, positions, segments, prefix = (np.zeros(shape, dtype=np.int64) for _ in range(4))
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(sorted(members), start=1):
            ids, lab, p = examples[i]
            span = slice(at, at + len(ids))
            input_ids[r, span], labels[r, span], prefix[r, span] = ids, lab, p
            attention[r, span], segments[r, span] = 1, segment
            positions[r, span] = np.arange(len(ids))
            at += len(ids)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention,
        "prefix_lengths": prefix,
        "position_ids": positions,
        "segment_ids": segments,
    }
