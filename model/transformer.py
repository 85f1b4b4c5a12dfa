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

# Relative, so this file and its siblings, copied side by side into a run folder, load with
# trust_remote_code=True where this package is not installed.
from .cache import KVCache
from .config import ROPE_BASE, MiniTuringConfig
from .constants import IGNORE_INDEX
from .copy_attention import (
    CopySpec,
    copy_distribution,
    copy_evaluation_loss,
    copy_log_probs,
    copy_source,
    copy_training_loss,
    shared_copy_distribution,
)
from .losses import autocast_dtype, chunked_loss, label_rows, labelled_positions, logits_loss
from .ops import RMSNorm, relu_squared, rotate

# ---------------------------------------------------------------------------- blocks


@dataclass
class LayerCall:
    """What a block is asked besides its input: the attention ``mask``, the ``cache`` and this
    ``layer``'s index in it; ``wanted`` (batch, q), the positions whose outputs alone are
    computed (keys and values are still computed everywhere; None: every position); with
    ``copy`` (the copy layer), also the copy distribution of every query, or of those at
    positions ``copy_at`` (batch, q). With rotary positions, ``rotary`` is the (cos, sin) of
    the keys' positions and ``rotary_q`` of the queries' (the same unless ``wanted``)."""

    mask: torch.Tensor | None
    cache: KVCache | None
    layer: int
    wanted: torch.Tensor | None = None
    copy: CopySpec | None = None
    copy_at: torch.Tensor | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    rotary_q: tuple[torch.Tensor, torch.Tensor] | None = None


def make_norm(config: MiniTuringConfig) -> nn.Module:
    """The config's normalisation of the hidden states (before each block's branches, and
    the final one)."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)


def rotary_tables(
    positions: torch.Tensor, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (batch or 1, 1, positions, head_dim) of rotary embeddings at ``positions``
    (batch or 1, positions): dimension i and i + head_dim / 2 turn together by the angle
    position * ROPE_BASE ** (-2i / head_dim) (RoFormer, LLaMA). The sine's first half is
    negated: it carries the rotation's minus sign (ops.rotate). Angles in fp32, tables in
    ``dtype``, the dtype the queries and keys are made in."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = ROPE_BASE ** (-exponents / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq
    cos, sin = angles.cos(), angles.sin()
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
    return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: MiniTuringConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.out.is_residual_projection = True
        self.dropout = config.attention_dropout
        self.attention = config.attention
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.layer_norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output for every position, or for ``call.wanted`` only (the queries are
        computed there alone), and with ``call.copy`` the copy distribution over the source
        (batch, queries, source length), else None."""
        b, t, d = x.shape
        h = self.num_heads
        wanted, cache, copy = call.wanted, call.cache, call.copy
        if wanted is None:
            q, k, v = self.qkv(x).view(b, t, 3, h, d // h).unbind(2)
        else:
            w, bias = self.qkv.weight, self.qkv.bias
            kv_bias, q_bias = (None, None) if bias is None else (bias[d:], bias[:d])
            k, v = F.linear(x, w[d:], kv_bias).view(b, t, 2, h, d // h).unbind(2)
            q = F.linear(_take(x, wanted), w[:d], q_bias).view(b, wanted.shape[1], h, d // h)
        if self.q_norm is not None:
            q, k = _head_norm(q, self.q_norm), _head_norm(k, self.k_norm)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if call.rotary is not None:
            q, k = rotate(q, *call.rotary_q), rotate(k, *call.rotary)
        dropout = self.dropout if self.training else 0.0
        copied, mask = None, call.mask
        if cache is not None and cache.group > 1:
            y, source = cache.attend_shared(call.layer, q, k, v, mask, copy is not None)
            if copy is not None:
                copied = shared_copy_distribution(*source, copy, b)
        else:
            if cache is not None:
                k, v = cache.update(call.layer, k, v)
            if copy is not None:
                copied = copy_distribution(q, k, copy, call.copy_at)
            if self.attention == "math" or (
                self.attention == "auto" and _math_attention_is_faster(q, k)
            ):
                y = _bf16_attention(q, k, v, mask, dropout)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(b, q.shape[2], d)), copied


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


def _head_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """``norm(x)`` with the mean square taken in fp32 and the product left in x's dtype (bf16
    under autocast, as the values). nn.RMSNorm given a bf16 input and its fp32 weight takes an
    unfused path, and upcasting the whole input costs more: at the tiny preset's shapes on a
    CPU core, forward + backward, 14 ms against 18-20 ms."""
    scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps).to(x.dtype)
    return x * scale * norm.weight.to(x.dtype)


def _take(x: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """x[i, wanted[i]] for each batch row i: (batch, t, d) -> (batch, q, d)."""
    return x.gather(1, wanted.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class FeedForward(nn.Module):
    """down(act(up(x))): GELU, ReLU squared, or SwiGLU, where ``up`` makes the gate and the
    value side by side and act(gate, value) = silu(gate) * value."""

    def __init__(self, config: MiniTuringConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.ffn_hidden_size
        self.kind = config.ffn
        self.up = nn.Linear(d, 2 * f if self.kind == "swiglu" else f, bias=config.bias)
        self.down = nn.Linear(f, d, bias=config.bias)
        self.down.is_residual_projection = True
        self.approximate = "tanh" if config.hidden_act == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.kind == "relu2":
            h = relu_squared(h)
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.down(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, config: MiniTuringConfig) -> None:
        super().__init__()
        self.ln1 = make_norm(config)
        self.attn = SelfAttention(config)
        self.ln2 = make_norm(config)
        self.ffn = FeedForward(config)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(batch, t, hidden) -> the same, or with ``call.wanted`` (batch, q) only those
        positions' outputs (batch, q, hidden): the last block needs no more than the loss reads.
        Also the attention's copy distribution, or None (SelfAttention)."""
        p = self.dropout if self.training else 0.0
        attended, copied = self.attn(self.ln1(x), call)
        x = (x if call.wanted is None else _take(x, call.wanted)) + _dropout(attended, p)
        x = x + _dropout(self.ffn(self.ln2(x)), p)
        return x, copied


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


def packed_attention_mask(
    segment_ids: torch.Tensor, in_prefix: torch.Tensor, queries: torch.Tensor, *, copy: bool = False
) -> torch.Tensor:
    """Boolean (batch, 1, queries, keys) mask of packed rows (several examples in a row, see
    ``data.objectives.summarize.pack``), True where attention is allowed: a query sees the keys
    of its own example (``segment_ids``, batch x keys), those in its prefix (``in_prefix``) and
    those up to itself; with ``copy``, only its prefix (what the copy path copies from).
    ``queries`` (batch, queries) are the queries' indices among the keys."""
    keys = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    q = queries.unsqueeze(1).unsqueeze(-1)
    same = segment_ids.gather(1, queries)[:, None, :, None] == segment_ids[:, None, None, :]
    prefix = in_prefix[:, None, None, :]
    if copy:
        return same & prefix
    # A query always sees itself, so no row is empty (an empty row would give NaN).
    return (same & (prefix | (keys <= q))) | (keys == q)


class MiniTuringModel(PreTrainedModel):
    """The UniLM-style transformer: token + position embeddings (or rotary positions in the
    attention), pre-norm blocks, final norm, and an output layer tied to the input embedding.

    With ``config.copy_attention`` (a pointer-generator, model/copy_attention.py),
    sequence-to-sequence calls (given ``prefix_lengths``, or a cache) predict from a mixture of
    the output layer's distribution and a copy distribution over the source, and return the
    mixture's log-probabilities as ``logits``. Bidirectional (masked-LM) calls are unchanged.
    """

    config_class = MiniTuringConfig
    base_model_prefix = "minituring"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: MiniTuringConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = (  # rotary positions have no table
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position == "learned"
            else None
        )
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = make_norm(config)
        if getattr(config, "copy_attention", False):
            self.copy_gate = nn.Linear(2 * config.hidden_size, 1)
        self.post_init()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 / BERT init: N(0, 0.02) for matrices and embeddings, zero biases, unit norms.
        Projections that write into the residual stream are scaled by 1/sqrt(2 * layers) so the
        residual's variance does not grow with depth, or with ``zero_init_proj`` start at zero
        (each block starts as the identity, as in modded-nanogpt)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            residual = getattr(module, "is_residual_projection", False)
            if residual and self.config.zero_init_proj:
                nn.init.zeros_(module.weight)
            else:
                std = std / math.sqrt(2 * self.config.num_layers) if residual else std
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
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
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (batch, seq, hidden), or with ``wanted`` (batch, q), indices
        into the sequence, those positions' only (batch, q, hidden).

        ``attention_mask`` (batch, keys) marks real tokens (1) and padding (0); with a cache it
        covers the cached positions plus the new ones. With ``wanted`` the last block computes
        keys and values everywhere but queries, attention output and feed-forward at the wanted
        positions alone: the same numbers there, at a fraction of the last block's cost when few
        positions are read (masked words, a summary after its document, the next token).
        """
        inputs = (input_ids, attention_mask, prefix_lengths, position_ids, cache)
        return self._states(*inputs, wanted=wanted, copy=False)[0]

    def _states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prefix_lengths: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: KVCache | None,
        *,
        wanted: torch.Tensor | None,
        copy: bool,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``hidden_states``; with ``copy``, also the copy layer's copy distribution at the same
        positions (batch, q, source length) and the source's token ids (batch, source length)."""
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        given_positions = position_ids is not None
        if position_ids is None:
            position_ids = torch.arange(offset, offset + t, device=input_ids.device).unsqueeze(0)
        limit = self.config.position_limit
        if limit is not None:
            # Known from the shape when not given: no device sync in training.
            furthest = (int(position_ids.max()) if t else 0) if given_positions else offset + t - 1
            if furthest >= limit:
                raise ValueError(
                    f"sequence position {furthest} is beyond the model's "
                    f"max_position_embeddings ({limit}); "
                    "shorten the input or train a model with longer positions"
                )

        in_prefix = None
        if segment_ids is not None:
            if cache is not None or not given_positions or prefix_lengths is None:
                raise ValueError(
                    "packed rows (segment_ids) need position_ids and prefix_lengths per token, "
                    "and no cache"
                )
            in_prefix = position_ids < prefix_lengths

        def mask_for(queries: torch.Tensor) -> torch.Tensor | None:
            if in_prefix is not None:
                return packed_attention_mask(segment_ids, in_prefix, queries.expand(b, -1))
            return attention_mask_for(
                query_positions=queries + offset,
                key_length=offset + t,
                key_padding=attention_mask,
                prefix_lengths=prefix_lengths,
            )

        every = torch.arange(t, device=input_ids.device).unsqueeze(0)
        mask = mask_for(every)
        spec, source_ids, copied = None, None, None
        if copy and in_prefix is not None:
            # Each query copies from its own example's source alone.
            queries = (every if wanted is None else wanted).expand(b, -1)
            source = packed_attention_mask(segment_ids, in_prefix, queries, copy=True)
            spec, source_ids = CopySpec(t, source, self.config.copy_head), input_ids
        elif copy:
            head = self.config.copy_head
            spec, source_ids = copy_source(input_ids, attention_mask, prefix_lengths, cache, head)
        copy_layer = self.config.copy_layer % len(self.blocks) if copy else -1
        p = self.config.dropout if self.training else 0.0
        x = self.embed(input_ids)
        rotary = None
        if self.position is not None:
            x = x + self.position(position_ids)
        else:
            dtype = autocast_dtype(x.device.type, x.dtype)
            rotary = rotary_tables(position_ids, self.config.head_dim, dtype)
        x = _dropout(x, p)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            call = LayerCall(mask, cache, i, rotary=rotary, rotary_q=rotary)
            if i == last and wanted is not None:
                call.mask, call.wanted = mask_for(wanted), wanted
                if rotary is not None:
                    at = position_ids.expand(b, -1).gather(1, wanted)
                    call.rotary_q = rotary_tables(at, self.config.head_dim, rotary[0].dtype)
            if spec is not None and i == copy_layer:
                call.copy, call.copy_at = spec, None if call.wanted is not None else wanted
            x, layer_copied = block(x, call)
            copied = layer_copied if call.copy is not None else copied
        if cache is not None:
            cache.length += t
        return self.ln_f(x), copied, source_ids

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
        label_smoothing: float = 0.0,
        segment_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> MiniTuringOutput:
        """With ``labels`` (IGNORE_INDEX where there is nothing to predict), returns the mean
        cross-entropy over labelled positions; the last block and the output layer run at those
        positions only, which for masked LM is ~15% of the sequence. In training,
        ``label_smoothing`` mixes that much of the cross-entropy against the uniform
        distribution into the loss (as ``F.cross_entropy`` does); evaluation never smooths.

        With copy attention, sequence-to-sequence calls (``prefix_lengths`` or ``cache``) give
        the copy mixture's log-probabilities as ``logits`` and its -log p(label) as the loss.

        Packed rows: ``segment_ids`` with per-example ``position_ids`` and per-token
        ``prefix_lengths``, as ``hidden_states`` says; the same loss as the examples unpacked."""
        inputs = (input_ids, attention_mask, prefix_lengths, position_ids, cache)
        copy = self.config.copy_attention and (prefix_lengths is not None or cache is not None)
        if labels is None:
            if segment_ids is not None:
                raise ValueError("packed rows (segment_ids) are for training losses, with labels")
            return MiniTuringOutput(logits=self._logits(inputs, copy, last_token_only))
        selected = labels != IGNORE_INDEX
        if self.config.sparse_outputs:
            wanted, valid = labelled_positions(selected)
        else:
            wanted, valid = None, selected
        h, copied, source_ids = self._states(
            *inputs, wanted=wanted, copy=copy, segment_ids=segment_ids
        )
        positions = position_ids if segment_ids is not None else None
        rows = label_rows(
            h, labels, input_ids, prefix_lengths, wanted, valid, copied, source_ids, positions
        )
        count = valid.sum()
        training = self.training and torch.is_grad_enabled() and h.requires_grad
        smoothing = label_smoothing if training else 0.0
        logits = None
        # The four loss paths: the copy mixture's or the output layer's, in training (chunk
        # by chunk, no logits kept) or in evaluation (with the logits).
        if copy and training:
            loss = copy_training_loss(rows, self.copy_gate, self.embed, smoothing)
        elif copy:
            loss, logits = copy_evaluation_loss(rows, self.copy_gate, self.embed)
        elif training and self.config.chunked_loss:
            loss = chunked_loss(rows, self.embed.weight, smoothing)
            if self.config.copy_attention:
                # A masked-LM batch leaves the copy gate out of the graph; data parallelism
                # (DDP without find_unused_parameters) wants a gradient for every parameter.
                loss = loss + 0.0 * sum(p.sum() for p in self.copy_gate.parameters())
        else:
            logits = self.logits_from_hidden(rows.h)
            loss = logits_loss(logits, rows, smoothing)
        return MiniTuringOutput(
            loss=loss / count.clamp(min=1), logits=logits, num_label_tokens=count
        )

    def _logits(self, inputs: tuple, copy: bool, last_token_only: bool) -> torch.Tensor:
        """A call without labels: the logits of every position, or of the last one; with the
        copy path, the mixture's log-probabilities."""
        input_ids = inputs[0]
        b, t = input_ids.shape
        wanted = None
        if last_token_only and t > 1:
            wanted = torch.full((b, 1), t - 1, dtype=torch.long, device=input_ids.device)
        h, copied, source_ids = self._states(*inputs, wanted=wanted, copy=copy)
        if copy:
            previous = input_ids if wanted is None else input_ids[:, -1:]
            source_ids = source_ids.unsqueeze(1).expand_as(copied)
            logits = copy_log_probs(self.copy_gate, self.embed, h, previous, copied, source_ids)
        else:
            logits = self.logits_from_hidden(h)
        return logits[:, -1] if last_token_only else logits


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
    wanted past the tokenizer (they only round the vocabulary up) and the special tokens (task
    tokens included), except ``allow`` (end-of-sequence, when generating)."""
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
        *(getattr(c, "task_tokens", None) or {}).values(),
    ]
    never[[i for i in specials if i is not None and i != allow]] = True
    return never
