"""Decoding state: the KV cache, whose source a document's beams share."""

from __future__ import annotations

import torch

from .config import MiniTuringConfig


class KVCache:
    """Pre-allocated keys and values of every layer, for incremental decoding.

    The source is encoded once; each decoding step appends one position. For beam search,
    ``share(k)`` then makes every row's cached positions (its source) common to k beams: they
    are stored once per source, and only the positions appended after are stored per beam, so
    the source is neither copied k times nor read k times a step (``attend_shared``).
    ``reorder`` follows beam search when it re-ranks hypotheses.
    """

    def __init__(
        self,
        config: MiniTuringConfig,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch_size, config.num_heads, max_length, config.head_dim)
        self.keys = [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)
        ]
        self.values = [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)
        ]
        self.length = 0
        self.max_length = max_length
        self.group = 1  # beams per source row, after share()
        self.shared = 0  # positions common to a row's beams
        self.shared_keys: list[torch.Tensor] = []  # their keys and values, after share()
        self.shared_values: list[torch.Tensor] = []
        # With copy attention: the token ids of the first call, the source (one row per
        # source, also after share()), which the copy distribution puts its mass on.
        self.source_ids: torch.Tensor | None = None

    def share(self, group: int) -> None:
        """From now on each row's cached positions serve ``group`` beams (rows i*group ...
        i*group + group - 1 of the calls that follow); later positions are kept per beam."""
        if self.group != 1:
            raise ValueError("the cache is already shared among beams")
        self.group, self.shared = group, self.length
        self.shared_keys = [x[:, :, : self.length] for x in self.keys]
        self.shared_values = [x[:, :, : self.length] for x in self.values]
        b, h, _, d = self.keys[0].shape
        own = (b * group, h, self.max_length - self.length, d)
        like = {"dtype": self.keys[0].dtype, "device": self.keys[0].device}
        self.keys = [torch.empty(own, **like) for _ in self.keys]
        self.values = [torch.empty(own, **like) for _ in self.values]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys and values; returns every cached one of this layer (after
        ``share``, the per-beam part only: ``attend_shared`` adds the source)."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions, asked for {end}")
        start, end = self.length - self.shared, end - self.shared
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, index: torch.Tensor, start: int = 0) -> None:
        """Rows follow ``index`` for positions ``start:length``. With ``start`` at the source
        length (beam search) only the generated positions, a few dozen, move."""
        if start < self.shared:
            raise ValueError("positions shared among beams cannot be reordered")
        begin, end = start - self.shared, self.length - self.shared
        for cache in (self.keys, self.values):
            for x in cache:
                x[:, :, begin:end] = x[:, :, begin:end].index_select(0, index)

    def attend_shared(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask,
        source_scores: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None]:
        """Attention of (rows, heads, queries, dim) queries, after ``share``: each source's
        keys are multiplied by the queries of all its beams at once, (sources, heads, beams x
        queries, source length), and the beams' own positions row by row; one softmax over
        both. ``mask`` is the model's (rows, 1, queries, keys) or None. Decoding only: no
        dropout.

        Returns the attention output and, with ``source_scores``, those scores over the shared
        source with the part of the mask over it ((sources, 1, beams x queries, source length),
        or None), which the copy distribution is read from (``shared_copy_distribution``)."""
        own_k, own_v = self.update(layer, k, v)
        src_k, src_v = self.shared_keys[layer], self.shared_values[layer]
        rows, h, nq, d = q.shape
        b, g = rows // self.group, self.group
        scale = d**-0.5
        # (rows, h, q, d) -> (sources, h, beams * q, d): a source's beams side by side.
        grouped = q.view(b, g, h, nq, d).transpose(1, 2).reshape(b, h, g * nq, d)
        scores_src = torch.matmul(grouped * scale, src_k.transpose(-1, -2))
        scores_own = torch.matmul(q * scale, own_k.transpose(-1, -2))  # (rows, h, q, own)
        scores_own = scores_own.view(b, g, h, nq, -1).transpose(1, 2).reshape(b, h, g * nq, -1)
        scores = torch.cat([scores_src, scores_own], dim=-1)
        source_len = src_k.shape[2]
        allowed = None
        if mask is not None:
            allowed = mask.view(b, g, 1, nq, -1).transpose(1, 2).reshape(b, 1, g * nq, -1)
            scores = scores.masked_fill(~allowed, float("-inf"))
        source = None
        if source_scores:
            source = (scores_src, None if allowed is None else allowed[..., :source_len])
        probs = torch.softmax(scores, dim=-1)
        out_src = torch.matmul(probs[..., :source_len], src_v)  # (sources, h, beams * q, d)
        probs_own = probs[..., source_len:].reshape(b, h, g, nq, -1).transpose(1, 2)
        out_own = torch.matmul(probs_own.reshape(rows, h, nq, -1), own_v)
        out = out_src.view(b, h, g, nq, d).transpose(1, 2).reshape(rows, h, nq, d) + out_own
        return out, source
