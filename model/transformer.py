"""One transformer stack for every objective (UniLM).

The same weights fill masks and write summaries; only the self-attention mask changes:

* bidirectional  every token sees every (non-pad) token: masked-word prediction;
* prefix-LM      tokens of the prefix (the source) see the whole prefix; tokens after it (the
                 target) see the prefix and the earlier target tokens: sequence-to-sequence.

A batch says which with ``prefix_lengths``: ``None`` is bidirectional, a length per row is
prefix-LM. Nothing here knows about optimizers, data or distributed training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

# Relative, so this file and config.py, copied side by side into a run folder, load with
# trust_remote_code=True where this package is not installed.
from .config import MiniTuringConfig

IGNORE_INDEX = -100


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of ``multiple``. Sizes that vary from batch to batch are
    rounded so that CPU matrix kernels, prepared per shape, see few distinct shapes."""
    return -(-n // multiple) * multiple


def autocast_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype matrix products run in here: autocast's, if it is on, else ``default``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


# ---------------------------------------------------------------------------- KV cache


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
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask
    ) -> torch.Tensor:
        """Attention of (rows, heads, queries, dim) queries, after ``share``: each source's
        keys are multiplied by the queries of all its beams at once, (sources, heads, beams x
        queries, source length), and the beams' own positions row by row; one softmax over
        both. ``mask`` is the model's (rows, 1, queries, keys) or None. Decoding only: no
        dropout."""
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
        if mask is not None:
            allowed = mask.view(b, g, 1, nq, -1).transpose(1, 2).reshape(b, 1, g * nq, -1)
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        source_len = src_k.shape[2]
        out_src = torch.matmul(probs[..., :source_len], src_v)  # (sources, h, beams * q, d)
        probs_own = probs[..., source_len:].reshape(b, h, g, nq, -1).transpose(1, 2)
        out_own = torch.matmul(probs_own.reshape(rows, h, nq, -1), own_v)
        return out_src.view(b, h, g, nq, d).transpose(1, 2).reshape(rows, h, nq, d) + out_own


# ---------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    def __init__(self, config: MiniTuringConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.out.is_residual_projection = True
        self.dropout = config.dropout
        self.attention = config.attention

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        wanted: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output for every position, or with ``wanted`` (batch, q) positions
        only: keys and values are still computed for every position, queries for ``wanted``."""
        b, t, d = x.shape
        h = self.num_heads
        if wanted is None:
            q, k, v = self.qkv(x).view(b, t, 3, h, d // h).unbind(2)
        else:
            w, bias = self.qkv.weight, self.qkv.bias
            k, v = F.linear(x, w[d:], bias[d:]).view(b, t, 2, h, d // h).unbind(2)
            q = F.linear(_take(x, wanted), w[:d], bias[:d]).view(b, wanted.shape[1], h, d // h)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if cache is not None and cache.group > 1:
            y = cache.attend_shared(layer, q, k, v, mask)
        else:
            if cache is not None:
                k, v = cache.update(layer, k, v)
            if self.attention == "math" or (
                self.attention == "auto" and _math_attention_is_faster(q, k)
            ):
                y = _bf16_attention(q, k, v, mask, dropout)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(b, q.shape[2], d))


# Attention scores held per layer by the bf16 path: beyond this, SDPA's memory-lean kernel.
_MATH_ATTENTION_MAX_SCORES = 64 * 2**20


def _math_attention_is_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True for bf16 training on a CPU: there PyTorch's fused attention backward is 2-3x slower
    than two batched bf16 matmuls and a softmax (32 x 4 heads x 128 positions: 43 vs 16 ms per
    layer, forward + backward). Inference and other devices keep the fused kernel."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and torch.is_grad_enabled()
        and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= _MATH_ATTENTION_MAX_SCORES
    )


def _bf16_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, as scaled_dot_product_attention computes it, with the
    (batch, heads, queries, keys) probabilities materialised in bf16."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
        scores += bias.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout:
        probs = F.dropout(probs, dropout)
    return torch.matmul(probs, v)


def _take(x: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """x[i, wanted[i]] for each batch row i: (batch, t, d) -> (batch, q, d)."""
    return x.gather(1, wanted.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class FeedForward(nn.Module):
    def __init__(self, config: MiniTuringConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.ffn_size)
        self.down = nn.Linear(config.ffn_size, config.hidden_size)
        self.down.is_residual_projection = True
        self.approximate = "tanh" if config.hidden_act == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, config: MiniTuringConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        wanted: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, t, hidden) -> the same, or with ``wanted`` (batch, q) only those positions'
        outputs (batch, q, hidden): the last block needs no more than the loss reads."""
        p = self.dropout if self.training else 0.0
        attended = _dropout(self.attn(self.ln1(x), mask, cache, layer, wanted), p)
        x = (x if wanted is None else _take(x, wanted)) + attended
        return x + _dropout(self.ffn(self.ln2(x)), p)


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with probability p, not even called at 0 (the default, and every inference):
    a module call per residual branch was 4% of a greedy decoding step."""
    return F.dropout(x, p) if p > 0 else x


# ---------------------------------------------------------------------------- model


@dataclass
class MiniTuringOutput(ModelOutput):
    """``loss`` when labels are given (then ``logits`` only at labelled positions, flattened,
    and none in training, where the loss is taken without them); otherwise ``logits`` for every
    position, or the last one with ``last_token_only``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_label_tokens: torch.Tensor | None = None


def attention_mask_for(
    *,
    query_positions: torch.Tensor,
    key_length: int,
    key_padding: torch.Tensor | None,
    prefix_lengths: torch.Tensor | None,
) -> torch.Tensor | None:
    """Boolean (batch, 1, queries, keys) mask, True where attention is allowed.

    ``query_positions`` are the queries' indices among the keys (batch or broadcast, queries).
    Returns None when every query may see every key, so SDPA can take its fastest kernel.
    """
    if prefix_lengths is None and key_padding is None:
        return None
    keys = torch.arange(key_length, device=query_positions.device)
    q = query_positions.view(-1, 1, query_positions.shape[-1], 1)
    allowed = torch.ones(1, 1, 1, key_length, dtype=torch.bool, device=keys.device)
    if prefix_lengths is not None:
        prefix = prefix_lengths.view(-1, 1, 1, 1)
        allowed = (keys < prefix) | (keys <= q)
    if key_padding is not None:
        allowed = allowed & key_padding.view(key_padding.shape[0], 1, 1, key_length).bool()
    # A query always sees itself, so no row is empty (an empty row would give NaN).
    return allowed | (keys == q)


class MiniTuringModel(PreTrainedModel):
    """The UniLM-style transformer: token + position embeddings, pre-norm blocks, final norm,
    and an output layer tied to the input embedding."""

    config_class = MiniTuringConfig
    base_model_prefix = "minituring"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: MiniTuringConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 / BERT init: N(0, 0.02) for matrices and embeddings, zero biases, unit norms.
        Projections that write into the residual stream are scaled by 1/sqrt(2 * layers) so the
        residual's variance does not grow with depth."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.config.num_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    # ------------------------------------------------------------------ forward

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        wanted: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (batch, seq, hidden), or with ``wanted`` (batch, q), indices
        into the sequence, those positions' only (batch, q, hidden).

        ``attention_mask`` (batch, keys) marks real tokens (1) and padding (0); with a cache it
        covers the cached positions plus the new ones. With ``wanted`` the last block computes
        keys and values everywhere but queries, attention output and feed-forward at the wanted
        positions alone: the same numbers there, at a fraction of the last block's cost when few
        positions are read (masked words, a summary after its document, the next token).
        """
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(offset, offset + t, device=input_ids.device).unsqueeze(0)
            furthest = offset + t - 1  # known from the shape: no device sync in training
        else:
            furthest = int(position_ids.max()) if t else 0
        if furthest >= self.config.max_position_embeddings:
            raise ValueError(
                f"sequence position {furthest} is beyond the model's "
                f"max_position_embeddings ({self.config.max_position_embeddings}); "
                "shorten the input or train a model with longer positions"
            )

        def mask_for(queries: torch.Tensor) -> torch.Tensor | None:
            return attention_mask_for(
                query_positions=queries + offset,
                key_length=offset + t,
                key_padding=attention_mask,
                prefix_lengths=prefix_lengths,
            )

        mask = mask_for(torch.arange(t, device=input_ids.device).unsqueeze(0))
        p = self.config.dropout if self.training else 0.0
        x = _dropout(self.embed(input_ids) + self.position(position_ids), p)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i == last and wanted is not None:
                x = block(x, mask_for(wanted), cache, i, wanted)
            else:
                x = block(x, mask, cache, i)
        if cache is not None:
            cache.length += t
        return self.ln_f(x)

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Output layer tied to the input embedding."""
        return F.linear(h, self.embed.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_token_only: bool = False,
        **kwargs,
    ) -> MiniTuringOutput:
        """With ``labels`` (IGNORE_INDEX where there is nothing to predict), returns the mean
        cross-entropy over labelled positions; the last block and the output layer run at those
        positions only, which for masked LM is ~15% of the sequence."""
        inputs = (input_ids, attention_mask, prefix_lengths, position_ids, cache)
        if labels is None:
            b, t = input_ids.shape
            if not last_token_only:
                return MiniTuringOutput(logits=self.logits_from_hidden(self.hidden_states(*inputs)))
            wanted = torch.full((b, 1), t - 1, dtype=torch.long, device=input_ids.device)
            h = self.hidden_states(*inputs, wanted=wanted if t > 1 else None)
            return MiniTuringOutput(logits=self.logits_from_hidden(h[:, -1]))
        selected = labels != IGNORE_INDEX
        if self.config.sparse_outputs:
            wanted, valid = labelled_positions(selected)
        else:
            wanted, valid = None, selected
        h = self.hidden_states(*inputs, wanted=wanted)
        if wanted is not None:
            labels = labels.gather(1, wanted)
        targets, h = labels[valid], h[valid]
        count = valid.sum()
        training = self.training and torch.is_grad_enabled() and h.requires_grad
        if training and self.config.chunked_loss:
            # Training: the loss and its gradients chunk by chunk, no logits kept.
            loss = linear_cross_entropy(h, self.embed.weight, targets)
            return MiniTuringOutput(loss=loss / count.clamp(min=1), num_label_tokens=count)
        logits = self.logits_from_hidden(h)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        return MiniTuringOutput(
            loss=loss / count.clamp(min=1), logits=logits, num_label_tokens=count
        )


# Rows of logits per chunk of linear_cross_entropy's softmax: 4 MiB of them in fp32, so that
# each chunk stays in a CPU core's cache; on a GPU, large enough to keep it busy.
_CE_CHUNK_ELEMENTS = {"cpu": 2**20}
_CE_CHUNK_ELEMENTS_DEFAULT = 2**26
# The label count changes every batch; rows padded to a multiple of this keep the matrix
# products to a few shapes (CPU kernels are prepared per shape: a new row count each step made
# them twice as slow, 37 vs 16 ms for the three products at ~1,000 x 8,192).
_CE_ROW_MULTIPLE = 64


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, dtype):
        rows = len(h)
        x, w = h.to(dtype), weight.to(dtype)
        # Zero rows up to the multiple: no loss, no gradient.
        x = F.pad(x, (0, 0, 0, round_up(rows, _CE_ROW_MULTIPLE) - rows))
        z = F.linear(x, w)  # the logits; each chunk is then overwritten by its gradient
        z[rows:] = 0
        chunk = max(1, _CE_CHUNK_ELEMENTS.get(h.device.type, _CE_CHUNK_ELEMENTS_DEFAULT) // len(w))
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            part, t = z[start:end], targets[start:end].unsqueeze(1)
            logits = part.float()  # part itself when already fp32
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            loss += (lse - logits.gather(1, t)).sum()
            # d loss / d logits = softmax - one-hot
            one_hot = torch.full_like(t, -1, dtype=logits.dtype)
            grad = logits.sub_(lse).exp_().scatter_add_(1, t, one_hot)
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
        )


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """``F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum")`` in value and
    gradients, taken together in the forward pass (backward only scales them): the logits in the
    autocast dtype, if on, and their softmax in fp32 a chunk of rows at a time, written back
    over the logits as their gradient. No fp32 copy of the (rows, vocabulary) logits, their
    log-softmax or its gradient is ever held whole; those cost a tenth of a summarization
    training step on a CPU.
    """
    kind = h.device.type
    dtype = autocast_dtype(kind, h.dtype)
    with torch.autocast(kind, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, dtype)


def labelled_positions(selected: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Which positions a loss reads, packed to the left of each row, in order.

    ``selected`` is (batch, t) boolean. Returns ``wanted`` (batch, q) indices, q the most labels
    in any row rounded up to a multiple of 8, with ``valid`` (batch, q) false where a row has
    fewer (those slots repeat some unlabelled position and are dropped); or ``(None, selected)``
    when q reaches the whole sequence.
    ``labels[selected]`` equals ``labels.gather(1, wanted)[valid]``.
    """
    counts = selected.sum(1)
    q = round_up(max(int(counts.max()) if selected.numel() else 0, 1), 8)
    if q >= selected.shape[1]:
        return None, selected
    # A stable sort puts each row's labelled positions first, in their order.
    wanted = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)[:, :q]
    valid = torch.arange(q, device=selected.device) < counts.unsqueeze(1)
    return wanted, valid


class MiniTuringForMaskedLM(MiniTuringModel):
    """The same network as served to Hugging Face's ``AutoModelForMaskedLM`` and
    ``pipeline("fill-mask")``.

    Without labels, tokens a masked word can never be (the special tokens and the embedding wanted
    past the tokenizer, which exist only for alignment) get -inf logits, so a softmax over the
    vocabulary gives the same probabilities as ``LM.fill_mask``. With labels the loss is the
    base model's, unchanged.
    """

    def forward(self, input_ids: torch.Tensor, *args, labels=None, **kwargs) -> MiniTuringOutput:
        out = super().forward(input_ids, *args, labels=labels, **kwargs)
        if labels is None:
            out.logits = out.logits.masked_fill(
                self.never_predicted(out.logits.device), float("-inf")
            )
        return out

    def never_predicted(self, device: torch.device | None = None) -> torch.Tensor:
        """Boolean (vocab_size,): True for ids a masked position is never filled with."""
        return never_predicted(self.config, device=device)


def never_predicted(
    config: MiniTuringConfig, *, allow: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean (vocab_size,): True for ids the model is never asked to produce: the embedding
    wanted past the tokenizer (they only round the vocabulary up) and the special tokens, except
    ``allow`` (end-of-sequence, when generating)."""
    c = config
    never = torch.zeros(c.vocab_size, dtype=torch.bool, device=device)
    never[c.tokenizer_size or c.vocab_size :] = True
    specials = [
        c.pad_token_id,
        c.unk_token_id,
        c.bos_token_id,
        c.eos_token_id,
        c.mask_token_id,
        c.sentence_mask_token_id,
    ]
    never[[i for i in specials if i is not None and i != allow]] = True
    return never
