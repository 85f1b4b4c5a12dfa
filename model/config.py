"""Model configuration and the size presets.

The configuration is a `transformers` config so a run folder's ``config.json`` is read by the
Auto classes; the presets are plain functions, as in torchtitan, not YAML trees.
"""

from __future__ import annotations

from transformers import PretrainedConfig

MODEL_TYPE = "minituring"
ACTIVATIONS = ("gelu", "gelu_tanh")
ATTENTIONS = ("auto", "sdpa", "math")
# Architecture choices. The first of each is the architecture of every run folder written
# before the choice existed, so a config.json without the field loads as it was trained.
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
FFNS = ("gelu", "swiglu", "relu2")
ROPE_BASE = 10000.0

# Whether runs trained from now on get the copy path (``copy_attention``). The config's own
# default stays False, so that a run folder written before the field existed loads as it was
# trained; a trainer building a new config passes this choice explicitly. On: at 400
# summarization steps on the embedded corpus it reached ROUGE-L 19.9 on the held-out pairs
# against 13.2 without (docs/performance.md).
COPY_ATTENTION_FOR_NEW_RUNS = True


class MiniTuringConfig(PretrainedConfig):
    """Shape of the one transformer stack shared by every objective.

    Token ids of the special tokens live here too so that the model, the tokenizer and the
    objectives can be checked against each other when a run folder is loaded.
    """

    model_type = MODEL_TYPE
    # Named text-to-text tasks, name -> the id of the token in front of their source
    # (``model.tokenizer.task_token``); set on a config only when the tokenizer has some, so the
    # config.json of a run without named tasks is as it always was.
    task_tokens: dict[str, int] | None = None

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        ffn_size: int = 1024,
        max_position_embeddings: int = 512,
        dropout: float = 0.0,
        attention_dropout: float | None = None,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        unk_token_id: int = 1,
        bos_token_id: int = 2,
        eos_token_id: int = 3,
        mask_token_id: int = 4,
        sentence_mask_token_id: int = 5,
        tokenizer_size: int | None = None,
        task_tokens: dict[str, int] | None = None,
        preset: str | None = None,
        seq_len: int | None = None,
        source_len: int | None = None,
        target_len: int | None = None,
        copy_attention: bool = False,
        copy_layer: int = -1,
        copy_head: int | None = None,
        attention: str = "auto",
        sparse_outputs: bool = True,
        chunked_loss: bool = True,
        position: str = "learned",
        norm: str = "layernorm",
        bias: bool = True,
        ffn: str = "gelu",
        qk_norm: bool = False,
        zero_init_proj: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.ffn_size = ffn_size
        self.max_position_embeddings = max_position_embeddings
        self.dropout = dropout
        # Dropout on the attention probabilities; None: ``dropout`` (config.json files written
        # before the two were separate have none).
        self.attention_dropout = dropout if attention_dropout is None else attention_dropout
        # "gelu" is the exact (erf) GELU of BERT and BART; "gelu_tanh" its tanh approximation.
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.sentence_mask_token_id = sentence_mask_token_id
        self.unk_token_id = unk_token_id
        # Number of entries the tokenizer actually has; vocab_size is this rounded up to a
        # multiple of 64 so the embedding matmul stays aligned.
        self.tokenizer_size = tokenizer_size
        if task_tokens:
            self.task_tokens = {str(k): int(v) for k, v in task_tokens.items()}
        self.preset = preset
        # The lengths the model was trained at, which inference needs: the masked-LM block,
        # and the longest summarization source and target. None in folders written before
        # they were recorded (or by other tools): readers fall back to DEFAULT_LENGTHS.
        self.seq_len = seq_len
        self.source_len = source_len
        self.target_len = target_len
        # Pointer-generator: summary positions mix the output layer's distribution with a copy
        # of the source, read off the attention of layer ``copy_layer`` (Python indexing; -1 is
        # the last) over the source, averaged over its heads or taken from head ``copy_head``.
        self.copy_attention = copy_attention
        self.copy_layer = copy_layer
        self.copy_head = copy_head
        # Speed choices that leave the numbers as they are (to float tolerance).
        # attention: "sdpa" is PyTorch's fused kernel; "math" two batched matmuls and a softmax;
        # "auto" the math form for bf16 training on a CPU, where it is faster, else SDPA.
        self.attention = attention
        # With labels, the last block and the output layer only at the positions the loss reads.
        self.sparse_outputs = sparse_outputs
        # The training loss chunk by chunk, gradients taken in the forward pass, no logits kept.
        self.chunked_loss = chunked_loss
        # Architecture. position: "learned" (a table of max_position_embeddings vectors added
        # to the tokens') or "rope" (rotary embeddings of q and k, RoFormer's half rotation with
        # base ROPE_BASE; no table, no length limit). norm: "layernorm" or "rmsnorm". bias: the
        # linear layers and norms of the blocks (and the final norm) have biases. ffn: "gelu"
        # (the activation is hidden_act), "swiglu" (gated, ``ffn_hidden_size`` wide) or "relu2"
        # (ReLU squared). qk_norm: RMSNorm of each head's queries and keys before attention.
        # zero_init_proj: the projections that write into the residual stream start at zero.
        self.position = position
        self.norm = norm
        self.bias = bias
        self.ffn = ffn
        self.qk_norm = qk_norm
        self.zero_init_proj = zero_init_proj
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {hidden_act!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        for name, value, choices in (
            ("position", position, POSITIONS),
            ("norm", norm, NORMS),
            ("ffn", ffn, FFNS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
            )
        if not -num_layers <= copy_layer < num_layers:
            raise ValueError(f"copy_layer must index one of {num_layers} layers, got {copy_layer}")
        if copy_head is not None and not 0 <= copy_head < num_heads:
            raise ValueError(f"copy_head must be one of {num_heads} heads or None, got {copy_head}")
        if position == "rope" and (hidden_size // num_heads) % 2:
            raise ValueError(
                f"rope rotates pairs of dimensions: the head size ({hidden_size // num_heads}) "
                "must be even"
            )

    @classmethod
    def from_preset(cls, preset: str = "tiny", **fields) -> MiniTuringConfig:
        """The config of a preset, with any shape field overridden (None: the preset's): the
        one place where "preset plus overrides" becomes a model shape."""
        shape = resolve_shape(preset, **{k: fields.pop(k) for k in SHAPE_FIELDS if k in fields})
        return cls(**shape, preset=preset, **fields)

    def length(self, name: str) -> int:
        """``seq_len``, ``source_len`` or ``target_len``, with the default for folders that
        did not record it."""
        value = getattr(self, name, None)
        return value if value is not None else DEFAULT_LENGTHS[name]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_limit(self) -> int | None:
        """The most positions a sequence may have: the learned table's size; None with rope."""
        return self.max_position_embeddings if self.position == "learned" else None

    @property
    def ffn_hidden_size(self) -> int:
        """Width of the feed-forward's inner layer: ``ffn_size``, or for swiglu, whose input
        layer has two halves (gate and value), two thirds of it rounded to a multiple of 8, so
        that the parameters stay about those of the GELU feed-forward of ``ffn_size``."""
        if self.ffn != "swiglu":
            return self.ffn_size
        return max(8, round(2 * self.ffn_size / 3 / 8) * 8)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count computed from the shape (tied output embedding counted once)."""
        d, f, n = self.hidden_size, self.ffn_hidden_size, self.num_layers
        b = 1 if self.bias else 0
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        attention = (3 * d * d + 3 * d * b) + (d * d + d * b)
        if self.qk_norm:
            attention += 2 * self.head_dim
        up = 2 * f if self.ffn == "swiglu" else f
        ffn = (d * up + up * b) + (f * d + d * b)
        total = n * (attention + ffn + 2 * norm) + norm
        if self.copy_attention:
            total += 2 * d + 1  # the copy gate: [hidden; previous token's embedding] -> 1
        if not non_embedding:
            total += self.vocab_size * d
            if self.position == "learned":
                total += self.max_position_embeddings * d
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix:
        6 * non-embedding params + 12 * layers * hidden * seq for attention, plus the output head."""
        n_params = self.num_parameters(non_embedding=True) + self.vocab_size * self.hidden_size
        return 6 * n_params + 12 * self.num_layers * self.hidden_size * seq_len


def round_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n entries: n rounded up to a multiple of 64."""
    return ((n + multiple - 1) // multiple) * multiple


# ---------------------------------------------------------------------------- presets
# Each preset returns the model shape plus the sequence length it is meant to train at.


def tiny() -> dict:
    """Laptop scale: trains in minutes on two CPU cores (5.3M parameters with rotary positions
    and an 8192-entry vocabulary; 5.4M with a learned table of 512 positions)."""
    return dict(hidden_size=256, num_layers=4, num_heads=4, ffn_size=1024, seq_len=128)


def small() -> dict:
    """A single GPU for an hour, or a patient CPU (30M parameters with an 8192-entry vocabulary)."""
    return dict(hidden_size=512, num_layers=8, num_heads=8, ffn_size=2048, seq_len=256)


def base() -> dict:
    """BERT-base shape: 12 layers, hidden 768, 12 heads (92M parameters with an 8192-entry
    vocabulary; BERT-base's 110M includes a 30k vocabulary)."""
    return dict(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072, seq_len=512)


PRESETS = {"tiny": tiny, "small": small, "base": base}
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "ffn_size", "seq_len")
DEFAULT_LENGTHS = {"seq_len": 128, "source_len": 256, "target_len": 48}


def resolve_shape(preset: str, **overrides: int | None) -> dict:
    """A preset's shape (``SHAPE_FIELDS``) with the overrides that are not None."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    unknown = set(overrides) - set(SHAPE_FIELDS)
    if unknown:
        raise TypeError(f"not shape fields: {', '.join(sorted(unknown))}")
    return {**PRESETS[preset](), **{k: v for k, v in overrides.items() if v is not None}}
