"""The copy path (pointer-generator). With ``config.copy_attention``, sequence-to-sequence calls
predict from a mixture at each position::

    p(w) = p_gen * softmax(logits)(w) + (1 - p_gen) * p_copy(w)

``p_copy`` is the attention of layer ``config.copy_layer`` at that position over the source (the
prefix, or a KV cache's first call), each head's renormalised over the source keys and averaged
over heads (or one head, ``config.copy_head``), summed per source token id;
``p_gen = sigmoid(copy_gate([h; embedding of the input token there]))``.

Here: which keys are the source (``copy_source``), the copy distribution from the copy layer's
queries and keys (``copy_distribution``; ``shared_copy_distribution`` for a cache shared by
beams), the mixture (``copy_log_probs``) and its two loss paths, for training and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .losses import LabelRows, linear_cross_entropy, linear_log_prob, pad_rows


@dataclass
class CopySpec:
    """What the copy layer's attention copies from: the first ``length`` keys, those where
    ``mask`` (batch, 1, 1 or queries, length) is True (all of them when None), one head's
    attention or (``head`` None) the mean over heads."""

    length: int
    mask: torch.Tensor | None
    head: int | None


def copy_source(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prefix_lengths: torch.Tensor | None,
    cache: KVCache | None,
    head: int | None,
) -> tuple[CopySpec, torch.Tensor]:
    """Which keys the copy distribution spreads over, and their token ids: the prefix of a
    sequence-to-sequence batch; with a cache, its first call (the source, encoded alone, whose
    token ids the cache keeps), one row per source also when beams share it."""
    b, t = input_ids.shape
    if cache is not None and cache.length > 0:
        if cache.source_ids is None:
            raise ValueError("copy attention needs the cache's first call to be the source")
        source_ids = cache.source_ids
        length = source_ids.shape[1]
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, :length].view(b, 1, 1, length).bool()
        if cache.group > 1:
            source_ids = source_ids.repeat_interleave(cache.group, dim=0)
        return CopySpec(length, mask, head), source_ids
    mask = None
    if prefix_lengths is not None:
        if cache is not None:
            raise ValueError("with copy attention, encode the source alone into a new cache")
        keys = torch.arange(t, device=input_ids.device)
        mask = (keys < prefix_lengths.view(-1, 1)).view(-1, 1, 1, t)
    if attention_mask is not None:
        padding = attention_mask.view(b, 1, 1, t).bool()
        mask = padding if mask is None else mask & padding
    if cache is not None:
        cache.source_ids = input_ids
    return CopySpec(t, mask, head), input_ids


# ---------------------------------------------------------------------------- distribution


def _source_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, heads, queries, source) attention scores -> (batch, queries, source): each
    head's attention renormalised over the allowed source keys, in fp32, averaged over heads."""
    scores = scores.float()
    if mask is not None:
        # A row with no source key at all (a row of padding) spreads evenly: no NaN.
        mask = mask | ~mask.any(-1, keepdim=True)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).mean(1)


def copy_distribution(
    q: torch.Tensor, k: torch.Tensor, copy: CopySpec, at: torch.Tensor | None = None
) -> torch.Tensor:
    """The copy distribution of (batch, heads, queries, dim) queries, or of those at positions
    ``at`` (batch, q), over the source keys ``k[:, :, :copy.length]``: (batch, queries, source
    length), fp32."""
    if at is not None:
        q = q.gather(2, at[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
    if copy.head is not None:
        q, k = q[:, copy.head : copy.head + 1], k[:, copy.head : copy.head + 1]
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k[:, :, : copy.length].transpose(-1, -2))
    return _source_softmax(scores, copy.mask)


def shared_copy_distribution(
    scores: torch.Tensor, mask: torch.Tensor | None, copy: CopySpec, rows: int
) -> torch.Tensor:
    """The copy distribution from the source scores of a cache shared by beams
    (``KVCache.attend_shared``), (sources, heads, beams x queries, source length) with their
    mask: (rows, queries, source length), fp32, a source's beams in consecutive rows."""
    source_len = scores.shape[-1]
    src = scores if copy.head is None else scores[:, copy.head : copy.head + 1]
    return _source_softmax(src, mask).reshape(rows, -1, source_len)


def log_of_probs(p: torch.Tensor) -> torch.Tensor:
    """log p with log 0 = -inf and a zero (not NaN) gradient there."""
    zero = p <= 0
    return p.clamp(min=torch.finfo(p.dtype).tiny).log().masked_fill(zero, float("-inf"))


# ---------------------------------------------------------------------------- mixture


def gate_logit(
    copy_gate: nn.Linear, embed: nn.Embedding, h: torch.Tensor, previous: torch.Tensor
) -> torch.Tensor:
    """The gate's logit (fp32), log p_gen = logsigmoid of it: from the hidden state and the
    embedding of the token each position reads (the previous token of its prediction).
    Its rows are padded to few counts, as the output layer's are (``pad_rows``)."""
    x = torch.cat([h, embed(previous)], dim=-1)
    rows = x.reshape(-1, x.shape[-1])
    gate = copy_gate(pad_rows(rows))[: len(rows)]
    return gate.view(x.shape[:-1]).float()


def copy_log_probs(
    copy_gate: nn.Linear,
    embed: nn.Embedding,
    h: torch.Tensor,
    previous: torch.Tensor,
    copied: torch.Tensor,
    source_ids: torch.Tensor,
) -> torch.Tensor:
    """log p(w) of the copy mixture, for every w: (..., vocab) fp32, from the hidden states
    ``h`` (..., hidden), the tokens read there ``previous`` (...), the copy distribution
    ``copied`` (..., source length) over the source tokens ``source_ids`` (the same shape).
    log p = logaddexp(log p_gen + log_softmax(logits), log(1 - p_gen) + log p_copy), with
    p_copy the copy distribution summed onto the vocabulary (scatter_add over token ids).
    """
    gate = gate_logit(copy_gate, embed, h, previous).unsqueeze(-1)
    log_vocab = F.log_softmax(F.linear(h, embed.weight).float(), dim=-1)
    shape = (*copied.shape[:-1], log_vocab.shape[-1])
    p_copy = copied.new_zeros(shape).scatter_add_(-1, source_ids, copied)
    return _mixture(gate, log_vocab, p_copy)


def _mixture(gate: torch.Tensor, log_vocab: torch.Tensor, p_copy: torch.Tensor) -> torch.Tensor:
    """log(p_gen p_vocab + (1 - p_gen) p_copy) from the gate's logit and log p_vocab."""
    return torch.logaddexp(
        F.logsigmoid(gate) + log_vocab, F.logsigmoid(-gate) + log_of_probs(p_copy)
    )


# ---------------------------------------------------------------------------- loss paths
# A sequence-to-sequence batch's labels inside its source (its masked words, filled in place:
# ``rows.filled``) are predicted by the output layer alone and never smoothed.


def copy_training_loss(
    rows: LabelRows, copy_gate: nn.Linear, embed: nn.Embedding, smoothing: float
) -> torch.Tensor:
    """The summed -log p(label) of the copy mixture, fp32, with neither distribution over the
    whole vocabulary kept: the output layer's log-probability of the label chunk by chunk
    (``linear_log_prob``), the copy probability of a token as the attention on the source
    positions that hold it. ``smoothing`` mixes in the output layer's cross-entropy against the
    uniform distribution: it smooths the words the model writes, not those it copies."""
    loss = rows.h.new_zeros((), dtype=torch.float32)
    if rows.filled is not None:
        loss = linear_cross_entropy(rows.h[rows.filled], embed.weight, rows.targets[rows.filled])
        rows = rows.where(~rows.filled)
    h, targets = rows.h, rows.targets
    gate = gate_logit(copy_gate, embed, h, rows.previous)
    log_vocab, uniform = linear_log_prob(h, embed.weight, targets)
    p_copy = (rows.copied * (rows.source_ids == targets.unsqueeze(-1))).sum(-1)
    loss = loss - (1 - smoothing) * _mixture(gate, log_vocab, p_copy).sum()
    if smoothing:
        loss = loss + smoothing * uniform.sum()
    return loss


def copy_evaluation_loss(
    rows: LabelRows, copy_gate: nn.Linear, embed: nn.Embedding
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed -log p(label) of the copy mixture, and its log-probabilities over the whole
    vocabulary (rows, vocab) fp32, which evaluation returns as logits."""
    h = rows.h
    logits = copy_log_probs(copy_gate, embed, h, rows.previous, rows.copied, rows.source_ids)
    if rows.filled is not None:
        plain = F.log_softmax(F.linear(h[rows.filled], embed.weight).float(), dim=-1)
        logits = logits.masked_scatter(rows.filled.unsqueeze(1), plain)
    return -logits.gather(1, rows.targets.unsqueeze(1)).sum(), logits
