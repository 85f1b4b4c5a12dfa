"""Masked-word prediction (BERT, with RoBERTa's dynamic masking and SpanBERT's spans).

Text is packed into fixed-length blocks, ``[CLS]`` + contiguous tokens, with documents
separated by ``[SEP]``: no padding is wasted. Masking is drawn per block from a generator
seeded by the block's global index, so the same block is masked the same way whatever the
number of processes, and a resumed run repeats the masks of the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.constants import IGNORE_INDEX


@dataclass
class MaskingConfig:
    rate: float = 0.15
    """Fraction of (non-special) tokens to predict; up to 0.4 works well for short runs."""
    whole_word: bool = True
    """Mask every piece of a word together."""
    span: bool = False
    """Mask contiguous spans of words with geometric lengths (SpanBERT) instead of single words."""
    mean_span: float = 3.0
    max_span: int = 10
    replace_mask: float = 0.8
    replace_random: float = 0.1

    def validate(self) -> None:
        if not 0 < self.rate < 1:
            raise ValueError(f"mask rate must be in (0, 1), got {self.rate}")
        if (
            self.replace_mask + self.replace_random > 1
            or min(self.replace_mask, self.replace_random) < 0
        ):
            raise ValueError("mask/random replacement fractions must be >= 0 and sum to at most 1")
        if self.span and self.mean_span < 1:
            raise ValueError(f"mean span length must be >= 1, got {self.mean_span}")


def pack_blocks(flat: np.ndarray, seq_len: int) -> int:
    """Number of ``seq_len`` blocks the flat token stream gives (one position is [CLS])."""
    return len(flat) // (seq_len - 1)


def block(flat: np.ndarray, index: int, seq_len: int, cls_id: int) -> np.ndarray:
    body = flat[index * (seq_len - 1) : (index + 1) * (seq_len - 1)]
    return np.concatenate([[cls_id], body]).astype(np.int64)


def _word_groups(ids: np.ndarray, maskable: np.ndarray, word_start: np.ndarray | None):
    """Index of the word each token belongs to (a token is its own word without a table)."""
    if word_start is None:
        return np.arange(len(ids))
    starts = word_start[ids] | ~maskable
    starts[1:] |= ~maskable[:-1]  # a word never continues across an unmaskable token
    starts[0] = True
    return np.cumsum(starts) - 1


def choose_masked(
    ids: np.ndarray,
    rng: np.random.Generator,
    cfg: MaskingConfig,
    maskable: np.ndarray,
    word_start: np.ndarray | None,
) -> np.ndarray:
    """Boolean positions to predict in one sequence."""
    groups = _word_groups(ids, maskable, word_start if cfg.whole_word else None)
    n_groups = groups[-1] + 1 if len(groups) else 0
    if n_groups == 0:
        return np.zeros(len(ids), dtype=bool)
    if not cfg.span:
        chosen = rng.random(n_groups) < cfg.rate
    else:
        # SpanBERT: geometric span lengths (in words) until the token budget is spent.
        chosen = np.zeros(n_groups, dtype=bool)
        budget = cfg.rate * maskable.sum()
        covered = 0
        p = 1.0 / cfg.mean_span
        tries = 0
        group_sizes = np.bincount(groups[maskable], minlength=n_groups)
        while covered < budget and tries < 4 * len(ids):
            tries += 1
            length = min(int(rng.geometric(p)), cfg.max_span)
            start = int(rng.integers(0, n_groups))
            span = slice(start, min(start + length, n_groups))
            new = ~chosen[span]
            added = int(group_sizes[span][new].sum())
            if covered + added > budget * 1.1 and covered > 0:
                continue
            chosen[span] = True
            covered += added
    return chosen[groups] & maskable


def mask_sequence(
    ids: np.ndarray,
    rng: np.random.Generator,
    cfg: MaskingConfig,
    *,
    mask_id: int,
    never_masked: np.ndarray,
    random_pool: np.ndarray,
    word_start: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (inputs, labels) for one sequence: labels hold the original token at the chosen
    positions and IGNORE_INDEX elsewhere; inputs get 80% [MASK], 10% a random token, 10% kept."""
    maskable = ~np.isin(ids, never_masked)
    chosen = choose_masked(ids, rng, cfg, maskable, word_start)
    labels = np.where(chosen, ids, IGNORE_INDEX)
    inputs = ids.copy()
    r = rng.random(len(ids))
    to_mask = chosen & (r < cfg.replace_mask)
    to_random = chosen & (r >= cfg.replace_mask) & (r < cfg.replace_mask + cfg.replace_random)
    inputs[to_mask] = mask_id
    inputs[to_random] = random_pool[rng.integers(0, len(random_pool), int(to_random.sum()))]
    return inputs, labels
