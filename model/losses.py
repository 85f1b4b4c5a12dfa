"""The losses over the tied output layer: the positions they read (``labelled_positions``,
``LabelRows``), the cross-entropy chunk by chunk with no full logits kept, and the two loss
paths of batches without copy attention (model/copy_attention.py has the copy path's)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .constants import round_up


def autocast_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype matrix products run in here: autocast's, if it is on, else ``default``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


# Rows of logits per chunk of linear_cross_entropy's softmax: 4 MiB of them in fp32, so that
# each chunk stays in a CPU core's cache; on a GPU, large enough to keep it busy.
_CE_CHUNK_ELEMENTS = {"cpu": 2**20}
_CE_CHUNK_ELEMENTS_DEFAULT = 2**26
# The label count changes every batch. CPU matrix kernels are prepared and cached per shape (a
# new row count each step made the output layer's three products twice as slow, 37 vs 16 ms at
# ~1,000 x 8,192), and every cached kernel holds memory for the rest of the run. Rows padded to
# four sizes per doubling (a multiple of 64 up to 512) keep the products to a few shapes.
_ROW_MULTIPLE = 64


def padded_rows(rows: int) -> int:
    """``rows`` rounded up to one of few sizes: a multiple of 64 up to 512, then of a quarter of
    the power of two below it (640, 768, 896, 1024, 1280, ...: under a quarter more rows)."""
    multiple = max(_ROW_MULTIPLE, 1 << max((rows - 1).bit_length() - 3, 0))
    return round_up(rows, multiple)


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (rows, ...) with zero rows appended up to ``padded_rows(rows)``."""
    extra = padded_rows(len(x)) - len(x)
    if not extra:
        return x
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))])


def _padded_logits(h, weight, dtype):
    """``h`` and ``weight`` in ``dtype``, h's rows zero-padded (``pad_rows``: the padding has no
    loss and no gradient), and their product, the logits, zero on the padding rows."""
    x, w = h.to(dtype), weight.to(dtype)
    x = pad_rows(x)
    z = F.linear(x, w)
    z[len(h) :] = 0
    return x, w, z


def _chunks(z, rows, targets):
    """For each chunk of the first ``rows`` rows of the logits ``z``: its range, its part of
    ``z``, its targets (n, 1), its logits in fp32 (the part itself when already fp32) and their
    logsumexp (n, 1)."""
    chunk = max(1, _CE_CHUNK_ELEMENTS.get(z.device.type, _CE_CHUNK_ELEMENTS_DEFAULT) // z.shape[1])
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        part, t = z[start:end], targets[start:end].unsqueeze(1)
        logits = part.float()
        yield start, end, part, t, logits, torch.logsumexp(logits, dim=-1, keepdim=True)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, dtype, smoothing):
        rows = len(h)
        x, w, z = _padded_logits(h, weight, dtype)  # each chunk of z then becomes its gradient
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for _, _, part, t, logits, lse in _chunks(z, rows, targets):
            loss += (1 - smoothing) * (lse - logits.gather(1, t)).sum()
            if smoothing:  # the cross-entropy against the uniform distribution
                loss += smoothing * (lse - logits.mean(-1, keepdim=True)).sum()
            # d loss / d logits = softmax - (1 - smoothing) one-hot - smoothing / vocabulary
            one_hot = torch.full_like(t, smoothing - 1, dtype=logits.dtype)
            grad = logits.sub_(lse).exp_().scatter_add_(1, t, one_hot)
            if smoothing:
                grad.sub_(smoothing / logits.shape[1])
            if grad.data_ptr() != part.data_ptr():
                part.copy_(grad)
        needs = ctx.needs_input_grad
        grad_h = (z @ w)[:rows].to(h.dtype) if needs[0] else None
        grad_w = (z.t() @ x).to(weight.dtype) if needs[1] else None
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_loss if grad_h is not None else None,
            grad_w * grad_loss if grad_w is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
):
    """``F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum",
    label_smoothing=label_smoothing)`` in value and gradients, taken together in the forward
    pass (backward only scales them): the logits in the autocast dtype, if on, and their softmax
    in fp32 a chunk of rows at a time, written back over the logits as their gradient. No fp32
    copy of the (rows, vocabulary) logits, their log-softmax or its gradient is ever held whole;
    those cost a tenth of a summarization training step on a CPU.
    """
    kind = h.device.type
    dtype = autocast_dtype(kind, h.dtype)
    with torch.autocast(kind, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, dtype, float(label_smoothing))


class _LinearLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, dtype):
        rows = len(h)
        x, w, z = _padded_logits(h, weight, dtype)  # each chunk of z then becomes its softmax
        log_p = torch.empty(rows, dtype=torch.float32, device=h.device)
        uniform = torch.empty(rows, dtype=torch.float32, device=h.device)
        for start, end, part, t, logits, lse in _chunks(z, rows, targets):
            log_p[start:end] = (logits.gather(1, t) - lse).squeeze(1)
            uniform[start:end] = (lse - logits.mean(-1, keepdim=True)).squeeze(1)
            probs = logits.sub_(lse).exp_()
            if probs.data_ptr() != part.data_ptr():
                part.copy_(probs)
        ctx.save_for_backward(x, w, z, targets)
        ctx.rows, ctx.dtypes = rows, (h.dtype, weight.dtype)
        return log_p, uniform

    @staticmethod
    def backward(ctx, grad_log_p, grad_uniform):
        x, w, z, targets = ctx.saved_tensors
        pad = (0, len(z) - ctx.rows)
        g_log_p = F.pad(grad_log_p.float(), pad).unsqueeze(1)
        g_uniform = F.pad(grad_uniform.float(), pad).unsqueeze(1)
        # d log_p / d logits = one-hot - softmax; d uniform / d logits = softmax - 1 / vocabulary
        gz = z * (g_uniform - g_log_p).to(z.dtype)
        gz[: ctx.rows].scatter_add_(1, targets.unsqueeze(1), g_log_p[: ctx.rows].to(z.dtype))
        gz.sub_((g_uniform / z.shape[1]).to(z.dtype))
        needs = ctx.needs_input_grad
        grad_h = (gz @ w)[: ctx.rows].to(ctx.dtypes[0]) if needs[0] else None
        grad_w = (gz.t() @ x).to(ctx.dtypes[1]) if needs[1] else None
        return grad_h, grad_w, None, None


def linear_log_prob(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """``(log_softmax(logits).gather(1, targets[:, None])[:, 0], -log_softmax(logits).mean(1))``
    of ``logits = F.linear(h, weight).float()``: the log-probability of each row's target and its
    cross-entropy against the uniform distribution (label smoothing's term), (rows,) fp32 each, in
    value and gradients, as ``linear_cross_entropy`` computes them (logits in the autocast dtype,
    their softmax in fp32 a chunk at a time, never held whole in fp32); each row's gradient is
    scaled by its own upstream gradient (the copy mixture weighs rows differently), so the two
    products run in the backward pass."""
    kind = h.device.type
    dtype = autocast_dtype(kind, h.dtype)
    with torch.autocast(kind, enabled=False):
        return _LinearLogProb.apply(h, weight, targets, dtype)


# The last block's queries per row (the most labels in a row) are rounded up to a multiple of
# this: a few shapes for its products, whose CPU kernels are prepared and kept per shape.
# Summaries' label counts spread widely (target words and masked source words); at a multiple
# of 8, 120-150 steps of the default job peaked at 1,377-1,480 MiB (four runs), at 32 at
# 1,255-1,347 MiB (four), at the same tokens/s within the machine's drift.
QUERY_MULTIPLE = 32


def labelled_positions(selected: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Which positions a loss reads, packed to the left of each row, in order.

    ``selected`` is (batch, t) boolean. Returns ``wanted`` (batch, q) indices, q the most labels
    in any row rounded up to a multiple of :data:`QUERY_MULTIPLE`, with ``valid`` (batch, q)
    false where a row has fewer (those slots repeat some unlabelled position and are dropped);
    or ``(None, selected)`` when q reaches the whole sequence.
    ``labels[selected]`` equals ``labels.gather(1, wanted)[valid]``.
    """
    counts = selected.sum(1)
    q = round_up(max(int(counts.max()) if selected.numel() else 0, 1), QUERY_MULTIPLE)
    if q >= selected.shape[1]:
        return None, selected
    # A stable sort puts each row's labelled positions first, in their order.
    wanted = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)[:, :q]
    valid = torch.arange(q, device=selected.device) < counts.unsqueeze(1)
    return wanted, valid


# ---------------------------------------------------------------------------- loss paths


@dataclass
class LabelRows:
    """A batch's labelled positions as rows, one per label in batch order: what a loss path
    reads. ``h`` (rows, hidden) final hidden states, ``targets`` (rows,) the labels, ``filled``
    (rows,) True for labels inside a sequence-to-sequence source (its masked words, filled in
    place: by the output layer alone, never smoothed), None when there are none. The copy path
    adds ``previous`` (rows,), the token read there, ``copied`` (rows, source length), the copy
    distribution, and ``source_ids`` (the same shape), the token ids of the row's source."""

    h: torch.Tensor
    targets: torch.Tensor
    filled: torch.Tensor | None
    previous: torch.Tensor | None = None
    copied: torch.Tensor | None = None
    source_ids: torch.Tensor | None = None

    def where(self, keep: torch.Tensor) -> LabelRows:
        """The rows where ``keep`` (rows,) is True."""
        parts = (getattr(self, f.name) for f in fields(self))
        return LabelRows(*(None if x is None else x[keep] for x in parts))


def label_rows(
    h: torch.Tensor,
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    prefix_lengths: torch.Tensor | None,
    wanted: torch.Tensor | None,
    valid: torch.Tensor,
    copied: torch.Tensor | None = None,
    source_ids: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> LabelRows:
    """The rows of the labels at ``valid`` (batch, q), from the hidden states ``h`` (batch, q,
    hidden) at positions ``wanted`` (batch, q) (None: every position); with the copy path, also
    its copy distribution ``copied`` (batch, q, source length) and ``source_ids`` (batch, source
    length). Packed rows give each token's ``positions`` in its example (batch, seq) and
    ``prefix_lengths`` per token (batch, seq); otherwise a token's position is its index."""
    previous = input_ids
    prefix = None if prefix_lengths is None else prefix_lengths.view(len(labels), -1)
    if positions is None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(labels)
    if wanted is not None:
        labels, previous = labels.gather(1, wanted), input_ids.gather(1, wanted)
        positions = positions.gather(1, wanted)
        if prefix is not None and prefix.shape[1] > 1:
            prefix = prefix.gather(1, wanted)
    filled = None
    if prefix is not None:
        filled = (positions < prefix - 1)[valid]
        filled = filled if bool(filled.any()) else None
    if copied is None:
        return LabelRows(h[valid], labels[valid], filled)
    # Each label's row of the batch, for its source's token ids.
    batch_row = torch.arange(len(valid), device=valid.device).unsqueeze(1).expand_as(valid)
    h, previous, copied = h[valid], previous[valid], copied[valid]
    return LabelRows(h, labels[valid], filled, previous, copied, source_ids[batch_row[valid]])


def chunked_loss(rows: LabelRows, weight: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The summed cross-entropy of the output layer ``weight``, and its gradients, chunk by chunk
    with no logits kept (training)."""
    h, targets, filled = rows.h, rows.targets, rows.filled
    if filled is not None and smoothing:
        loss = linear_cross_entropy(h[filled], weight, targets[filled])
        return loss + linear_cross_entropy(h[~filled], weight, targets[~filled], smoothing)
    return linear_cross_entropy(h, weight, targets, smoothing)


def logits_loss(logits: torch.Tensor, rows: LabelRows, smoothing: float) -> torch.Tensor:
    """The summed cross-entropy of the rows' ``logits`` (rows, vocab)."""
    per_label = F.cross_entropy(
        logits.float(), rows.targets, reduction="none", label_smoothing=smoothing
    )
    if rows.filled is not None and smoothing:
        unsmoothed = F.cross_entropy(logits.float(), rows.targets, reduction="none")
        per_label = torch.where(rows.filled, unsmoothed, per_label)
    return per_label.sum()
