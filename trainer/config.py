"""The run's configuration: one small dataclass per concern, nested in ``TrainConfig``. Every
field is a flag of train.py (its docstring is the --help), and config.json records them all, so
training again from it reproduces the run."""

from __future__ import annotations

import codecs
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from data.config import DataConfig, check_objectives, check_tokenizer_options
from data.objectives import OBJECTIVES, is_task
from data.tasks import TaskError, check_eval_tasks, pair_tasks
from model.config import (
    ACTIVATIONS,
    ATTENTIONS,
    COPY_ATTENTION_FOR_NEW_RUNS,
    FFNS,
    NORMS,
    POSITIONS,
    PRESETS,
    MiniTuringConfig,
    resolve_shape,
    round_vocab,
)
from model.tokenizer import tokenizer_fields
from trainer.errors import TrainingError

SCHEDULES = ("wsd", "cosine")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class ModelOptions:
    preset: str = "tiny"
    """Model size: tiny (laptop, minutes), small, or base (about BERT-base)."""
    hidden_size: int | None = None
    """Override the preset's hidden size."""
    num_layers: int | None = None
    """Override the preset's number of transformer blocks."""
    num_heads: int | None = None
    """Override the preset's number of attention heads."""
    ffn_size: int | None = None
    """Override the preset's feed-forward width."""
    dropout: float = 0.0
    """Dropout on embeddings and residual branches (and attention, unless
    --attention-dropout says otherwise)."""
    attention_dropout: float | None = None
    """Dropout on the attention probabilities (default: --dropout's value)."""
    seq_len: int | None = None
    """Masked-LM block length in tokens (default: the preset's)."""
    max_positions: int = 512
    """Longest sequence the model supports (the learned position table; with --position rope
    no limit, and recorded only)."""
    copy_attention: bool = COPY_ATTENTION_FOR_NEW_RUNS
    """Summaries mix the output layer's words with words copied from the source, read off the
    attention of the last layer (pointer-generator)."""
    hidden_act: str = "gelu"
    """Feed-forward activation with --ffn gelu: gelu (exact, as in BERT and BART) or gelu_tanh
    (its tanh approximation)."""
    position: str = "rope"
    """Positions: rope (rotary embeddings of queries and keys, base 10000: no table, no length
    limit) or learned (a table of --max-positions vectors added to the tokens, as in BERT)."""
    norm: str = "rmsnorm"
    """Normalisation before each block's attention and feed-forward, and at the end:
    rmsnorm or layernorm."""
    bias: bool = True
    """Biases in the blocks' linear layers and norms (--no-bias: none)."""
    ffn: str = "relu2"
    """Feed-forward: relu2 (ReLU squared), gelu (--hidden-act) or swiglu (gated SiLU, 2/3 of
    --ffn-size wide, rounded to a multiple of 8: about the parameters of gelu's)."""
    qk_norm: bool = False
    """RMSNorm of each head's queries and keys before attention."""
    zero_init_proj: bool = False
    """Start the projections that write into the residual stream (attention output,
    feed-forward output) at zero instead of small random weights."""
    attention: str = "auto"
    """Attention kernel: sdpa (PyTorch's fused), math (matmuls and a softmax), or auto (math
    for bf16 training on CPU, where it is faster; else sdpa). Speed only."""
    sparse_outputs: bool = True
    """Run the last block and the output layer only at the positions the loss reads. Speed only."""
    chunked_loss: bool = True
    """Take the training loss and its gradients chunk by chunk, never holding all logits. Speed
    and memory only."""


@dataclass
class OptimConfig:
    batch_size: int = 32
    """Micro-batch size per process, in sequences."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (gradients summed; no sync until the last)."""
    max_batch_tokens: int | None = None
    """Positions (rows x length) one forward pass holds at most: a micro-batch longer than
    this (a batch of long documents) runs as pieces of it, with the same gradient and a
    fraction of the activation memory. Default: batch size x --seq-len, what a masked-LM
    batch holds; 0: never split."""
    optimizer: str = "adamw"
    """adamw, or muon: torch.optim.Muon (orthogonalised momentum) for the 2-D weight matrices
    of the transformer blocks, AdamW for the rest (embeddings, norms, biases, the copy gate).
    Muon's step is scaled per matrix to AdamW's update size (match_rms_adamw), so --lr,
    --weight-decay and the schedule drive both."""
    lr: float = 5e-4
    """Peak learning rate (AdamW; with --optimizer muon, Muon's too)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    schedule: str = "wsd"
    """Learning rate after the warm-up, as a function of the run's progress (the share of its
    planned steps done): wsd (warm-up, stable, decay: the peak until the last --decay-share of
    the run, then a 1-sqrt decay) or cosine (a decay over the whole run, the earlier default)."""
    decay_share: float = 0.2
    """wsd: the share of the run, at its end, over which the rate decays."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW's, and Muon's; not applied to biases, norms and
    embeddings)."""
    label_smoothing: float = 0.1
    """Label smoothing of the summaries' targets (summarize, gap_summary) in training: this
    share of the loss is the output layer's cross-entropy against the uniform distribution
    (and of the training loss logged). Masked LM and every evaluation are never smoothed."""
    beta1: float = 0.9
    beta2: float = 0.98
    clip_grad: float = 1.0
    """Clip the gradient's global norm to this (0: off)."""
    max_bad_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    fused_adamw: bool = True
    """AdamW's fused kernel (CPU and CUDA); off: PyTorch's default implementation. Speed only."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Run folder: config, tokenizer, weights, checkpoints, metrics."""
    resume: str | None = None
    """Continue the run in this folder from its last complete checkpoint."""
    init_from: str | None = None
    """Start a new run from the weights and tokenizer of this folder (a run folder, or any
    folder model.load reads), with its own data, objectives, schedule and a fresh optimizer.
    Model options left out take the parent's values. Those that decide the weights (--preset,
    --hidden-size, --num-layers, --num-heads, --ffn-size, --max-positions, --copy-attention,
    --hidden-act, --position, --norm, --bias, --ffn, --qk-norm) and the tokenizer (--tokenizer,
    --tokenizer-kind, --vocab-size) are refused when they differ from the parent's; --seq-len,
    --source-len, --target-len, the dropouts, --attention, --sparse-outputs, --chunked-loss
    and --zero-init-proj may differ."""
    seed: int = 0
    """Seed for initialization, data order, masking and dropout."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    precision: str = "auto"
    """auto, fp32 or bf16 (autocast). auto: bf16 on GPU, and on CPU when it measures faster."""
    strategy: str = "auto"
    """Data parallelism: auto (ddp when launched with several processes, else none), ddp, or
    fsdp (FSDP2: parameters, gradients and optimizer state sharded across processes)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations during the backward pass: less memory, more compute."""
    compile: bool = False
    """torch.compile each transformer block (needs a C++ compiler on CPU, Triton on GPU)."""
    prefetch: int | None = None
    """Batches a background thread prepares ahead of the step (0: none, the step draws its own).
    Unset: 2 on CUDA, where the step would otherwise wait on the CPU; 0 on CPU, where the
    thread would take a core from the step's own math."""
    max_steps: int | None = None
    """Optimizer steps to train for (with --time-budget, at most this many). With neither
    flag, 2000 steps or 540 seconds, whichever ends first."""
    time_budget: float | None = None
    """Seconds the whole run takes, start-up, data preparation, evaluations and checkpoints
    included; the learning-rate schedule is fitted to the steps that fit, and refitted as the
    speed is measured (with --max-steps as a cap, when given)."""
    objectives: str = "auto"
    """Mixture, e.g. masked_lm=1,gap_summary=0.5,summarize=1; each named task of --train-pairs
    (title=titles.jsonl) is an objective of that name (summarize=1,title=0.5,masked_lm=0.25).
    auto: with document/summary pairs, weight 1 for each task (summarize and the named ones)
    and masked_lm=0.25 (the pairs first; masked LM, with the sources' masked words of
    --source-mask-rate, kept for the fill-mask skill), and gap_summary=1 when a task has fewer
    than 2000 training pairs (the text then teaches what the few pairs cannot); without pairs,
    masked_lm=1,gap_summary=1."""
    log_every: int = 20
    """Steps between metrics.jsonl lines."""
    eval_every: int = 400
    """Steps between evaluations on the validation split (--val-fraction; without one, on the
    held-out data). model.safetensors keeps the weights of the best one: validation ROUGE-L
    when summarize trains, else the masked-LM loss (else gap_summary's loss). The held-out data
    is evaluated at the end, with the kept weights. 0: only that; the last weights are kept."""
    patience: int = 0
    """End the run early when the validation score has not improved (strictly) in this many
    evaluations in a row (--eval-every): the learning rate then decays to its floor over
    --decay-share of the steps done so far (within the plan), and the run stops there. 0: off.
    Needs a validation split (--val-fraction > 0) and --eval-every > 0."""
    eval_batches: int = 8
    """Batches per objective for loss/accuracy at each evaluation."""
    rouge_samples: int = 200
    """Documents summarized for ROUGE at each evaluation, decoded as summarize does (the run's
    generation_config.json)."""
    save_every: int = 400
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in the run folder."""
    progress: bool = True
    """Show a progress bar."""
    report_to: str = "none"
    """Also log metrics to: none or tensorboard (event files in RUN/tensorboard; needs
    pip install -e ".[tensorboard]"). metrics.jsonl is always written."""


@dataclass
class TrainConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        parts = {}
        for f in dataclasses.fields(cls):
            sub = f.default_factory()
            known = {x.name for x in dataclasses.fields(sub)}
            values = {k: v for k, v in d.get(f.name, {}).items() if k in known}
            parts[f.name] = dataclasses.replace(sub, **values)
        return cls(**parts)


# The mixture of --objectives auto. With pairs, the supervised objective gets most of the
# budget: trained on the pairs alone for 10 minutes, held-out ROUGE-L was about twice the
# mixture's. Masked LM keeps a fifth of the steps for the fill-mask skill, which the pairs'
# masked source words (--source-mask-rate) train too (docs/performance.md, 2026-12-03).
AUTO_WITH_PAIRS = {"summarize": 1.0, "masked_lm": 0.25}
AUTO_TEXT_ONLY = {"masked_lm": 1.0, "gap_summary": 1.0}
# With few pairs, the run repeats them dozens of times and overfits; gap sentences on the text
# (self-supervised summarization, PEGASUS) then join the mixture at weight 1. 448 pairs and the
# embedded corpus's text, 10 minutes, ROUGE-L on 504 held-out pairs: 19.13 against 15.71 for
# summarize=1,masked_lm=0.25 and 16.71 for the pairs alone (docs/performance.md, "Few labels").
# With the 7,272 pairs of the embedded corpus the pairs come first (the default job).
FEW_PAIRS = 2000
AUTO_FEW_PAIRS = {"gap_summary": 1.0}
# And the fewer the pairs, the smaller their weight beside the objectives on text: a pair task's
# weight is its training pairs / PAIRS_AT_FULL_WEIGHT, at most 1, so that a run repeats a few
# hundred pairs about as often as a thousand (a set number of passes at a given budget and
# speed). 450 embedded pairs with all the text, held-out ROUGE-L of the last weights, weight 0.3
# against 1: +1.20 +- 0.54 at 10 minutes, +2.76 +- 0.59 at 30; 1,000 pairs: +0.14 +- 0.51;
# 2,000 pairs (weight 1 by this rule): -0.85 +- 0.50; the Debian pairs (503): -0.88 +- 1.54
# (docs/performance.md, "The pairs' weight by their number").
PAIRS_AT_FULL_WEIGHT = 1500


def parse_objectives(
    spec: str,
    available: list[str] | None,
    tasks: list[str] | None = None,
    pairs: dict[str, int] | None = None,
) -> dict[str, float]:
    """'masked_lm=1,summarize=0.5' -> weights; 'auto' -> the recipe for the available ones
    (``pairs``: the training pairs of each pair task; under ``FEW_PAIRS`` for the one that has
    fewest, gap sentences join, and beside objectives on text each task's weight is its share of
    ``PAIRS_AT_FULL_WEIGHT``). With ``available`` None (before the data is read) only the
    spelling is checked, and the named tasks against ``tasks`` (those of --train-pairs) when
    given."""
    if spec.strip() == "auto":
        if available is None:
            return {}
        if not available:
            raise ValueError(
                "no training data left: every document was held out for evaluation "
                "(use more data, a smaller --eval-fraction, or --eval-text / --eval-pairs)"
            )
        named = [n for n in available if n not in OBJECTIVES]
        if "summarize" in available or named:
            # Every text-to-text task as summarize: weight 1 each.
            recipe = {**AUTO_WITH_PAIRS, **dict.fromkeys(named, AUTO_WITH_PAIRS["summarize"])}
            counts = {n: c for n, c in (pairs or {}).items() if n in available}
            if counts and min(counts.values()) < FEW_PAIRS:
                recipe |= AUTO_FEW_PAIRS
            if counts and ("masked_lm" in available or "gap_summary" in available):
                for name, count in counts.items():
                    recipe[name] *= min(1.0, count / PAIRS_AT_FULL_WEIGHT)
        else:
            recipe = AUTO_TEXT_ONLY
        return {name: recipe[name] for name in available if recipe.get(name)}
    weights = {}
    expected = ", ".join(OBJECTIVES) + (f" or a task of --train-pairs ({', '.join(tasks)})"
                                        if tasks else " or a task named in --train-pairs")  # fmt: skip
    for part in spec.split(","):
        name, _, value = part.strip().partition("=")
        known = name in OBJECTIVES or (is_task(name) and (tasks is None or name in tasks))
        if not known:
            raise ValueError(f"unknown objective {name!r} in --objectives; expected {expected}")
        try:
            weights[name] = float(value) if value else 1.0
        except ValueError:
            raise ValueError(
                f"--objectives: weight of {name} must be a number, got {value!r}"
            ) from None
        if not (math.isfinite(weights[name]) and weights[name] >= 0):
            raise ValueError(
                f"--objectives: weight of {name} must be a finite number >= 0, got {value!r}"
            )
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"--objectives {spec!r}: at least one objective needs a weight > 0")
    if available is None:
        return weights
    missing = [n for n, w in weights.items() if w > 0 and n not in available]
    if missing:
        need = {"summarize": "document/summary pairs (--train-pairs)"}
        need |= {n: f"pairs (--train-pairs {n}=FILE)" for n in missing if n not in OBJECTIVES}
        raise ValueError(
            "; ".join(f"objective {n} needs {need.get(n, 'text (--train-text)')}" for n in missing)
        )
    return weights


def build_model_config(cfg: TrainConfig, tokenizer=None) -> MiniTuringConfig:
    """The model these options build for ``tokenizer``, with the lengths it trains at recorded
    in it (inference needs them, and must not read the training options). Without a tokenizer,
    the vocabulary --vocab-size asks for (benchmarks)."""
    m = cfg.model
    vocab = {"vocab_size": round_vocab(cfg.data.vocab_size)}
    return MiniTuringConfig.from_preset(
        m.preset,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        ffn_size=m.ffn_size,
        seq_len=m.seq_len,
        source_len=cfg.data.source_len,
        target_len=cfg.data.target_len,
        max_position_embeddings=m.max_positions,
        dropout=m.dropout,
        attention_dropout=m.attention_dropout,
        copy_attention=m.copy_attention,
        hidden_act=m.hidden_act,
        position=m.position,
        norm=m.norm,
        bias=m.bias,
        ffn=m.ffn,
        qk_norm=m.qk_norm,
        zero_init_proj=m.zero_init_proj,
        attention=m.attention,
        sparse_outputs=m.sparse_outputs,
        chunked_loss=m.chunked_loss,
        **(tokenizer_fields(tokenizer) if tokenizer is not None else vocab),
    )


def _range_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """Numbers outside their meaningful range, which would otherwise crash deep inside
    (a modulo by zero), train a degenerate model, or be silently replaced."""
    m, o, r, d = cfg.model, cfg.optim, cfg.run, cfg.data
    checks = [
        (r.log_every >= 1, f"--log-every must be >= 1, got {r.log_every}"),
        (r.save_every >= 0, f"--save-every must be >= 0 (0: only at the end), got {r.save_every}"),
        (r.eval_every >= 0, f"--eval-every must be >= 0 (0: only at the end), got {r.eval_every}"),
        (r.eval_batches >= 0, f"--eval-batches must be >= 0, got {r.eval_batches}"),
        (r.rouge_samples >= 0, f"--rouge-samples must be >= 0, got {r.rouge_samples}"),
        (r.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {r.keep_checkpoints}"),
        (
            r.prefetch is None or r.prefetch >= 0,
            f"--prefetch must be >= 0 (0: off), got {r.prefetch}",
        ),
        (o.max_bad_steps >= 1, f"--max-bad-steps must be >= 1, got {o.max_bad_steps}"),
        (o.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {o.warmup_steps}"),
        (0 <= o.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {o.min_lr_ratio}"),
        (
            o.optimizer in OPTIMIZERS,
            f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {o.optimizer!r}",
        ),
        (
            o.schedule in SCHEDULES,
            f"--schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}",
        ),
        (0 < o.decay_share <= 1, f"--decay-share must be in (0, 1], got {o.decay_share}"),
        (o.weight_decay >= 0, f"--weight-decay must be >= 0, got {o.weight_decay}"),
        (
            0 <= o.label_smoothing < 1,
            f"--label-smoothing must be in [0, 1), got {o.label_smoothing}",
        ),
        (o.clip_grad >= 0, f"--clip-grad must be >= 0 (0: off), got {o.clip_grad}"),
        (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)"),
        (math.isfinite(o.lr), f"--lr must be a finite number, got {o.lr}"),
        (0 <= m.dropout < 1, f"--dropout must be in [0, 1), got {m.dropout}"),
        (
            m.attention_dropout is None or 0 <= m.attention_dropout < 1,
            f"--attention-dropout must be in [0, 1), got {m.attention_dropout}",
        ),
        (0 <= d.eval_fraction < 1, f"--eval-fraction must be in [0, 1), got {d.eval_fraction}"),
        (0 <= d.val_fraction < 1, f"--val-fraction must be in [0, 1), got {d.val_fraction}"),
        (d.pad_multiple >= 1, f"--pad-multiple must be >= 1, got {d.pad_multiple}"),
        (
            d.pack_pairs in ("auto", "on", "off"),
            f"--pack-pairs must be auto, on or off, got {d.pack_pairs!r}",
        ),
        (
            m.hidden_act in ACTIVATIONS,
            f"--hidden-act must be one of {', '.join(ACTIVATIONS)}, got {m.hidden_act!r}",
        ),
        (
            m.attention in ATTENTIONS,
            f"--attention must be one of {', '.join(ATTENTIONS)}, got {m.attention!r}",
        ),
        (
            m.position in POSITIONS,
            f"--position must be one of {', '.join(POSITIONS)}, got {m.position!r}",
        ),
        (m.norm in NORMS, f"--norm must be one of {', '.join(NORMS)}, got {m.norm!r}"),
        (m.ffn in FFNS, f"--ffn must be one of {', '.join(FFNS)}, got {m.ffn!r}"),
    ]
    for flag in ("hidden_size", "num_layers", "num_heads", "ffn_size"):
        value = getattr(m, flag)
        checks.append(
            (value is None or value >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {value}")
        )
    return checks


def _init_from_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """A new run from a parent (--init-from; a resumed child has it recorded too)."""
    parent, r = cfg.run.init_from, cfg.run
    if not parent or r.resume is not None:
        return []
    return [
        (
            Path(parent).resolve() != Path(r.output_dir).resolve(),
            f"--init-from {parent} is the --output-dir: the child run needs a folder of its own",
        ),
        (
            not cfg.data.tokenizer,
            f"--tokenizer and --init-from contradict: the child uses {parent}'s tokenizer",
        ),
    ]


def _check_streaming(cfg: TrainConfig, weights: dict[str, float]) -> None:
    """--streaming reads --train-text and trains masked LM; refuse the rest before any data."""
    d = cfg.data
    if not d.train_text:
        raise TrainingError(
            "--streaming streams --train-text sources; give at least one (the embedded corpus "
            "is prepared, not streamed)"
        )
    if d.train_pairs or d.eval_pairs:
        raise TrainingError(
            "--streaming trains masked_lm only: --train-pairs / --eval-pairs (summarize) need "
            "the prepared path; leave out --streaming to train on pairs"
        )
    try:
        check_objectives(weights)
    except ValueError as err:
        raise TrainingError(str(err)) from None


def _check_patience(cfg: TrainConfig) -> None:
    """--patience counts periodic validation evaluations: refused where there are none."""
    r, d = cfg.run, cfg.data
    if not r.patience:
        return
    if r.patience < 0:
        raise TrainingError(f"--patience must be >= 0 (0: off), got {r.patience}")
    problem = (
        "--eval-every is 0 (no periodic evaluation)" if not r.eval_every
        else "--val-fraction is 0 (no validation split)" if not d.val_fraction
        else "--streaming has no validation split" if d.streaming
        else None
    )  # fmt: skip
    if problem:
        raise TrainingError(
            f"--patience {r.patience} counts validation evaluations without improvement, but "
            f"{problem}; give --eval-every > 0 and --val-fraction > 0, or leave out --patience"
        )


def _shape(cfg: TrainConfig) -> dict:
    """The model's shape: the preset's, with the options' overrides."""
    if cfg.model.preset not in PRESETS:
        raise TrainingError(
            f"unknown --preset {cfg.model.preset!r}; expected one of {', '.join(PRESETS)}"
        )
    m = cfg.model
    return resolve_shape(
        m.preset, hidden_size=m.hidden_size, num_heads=m.num_heads, seq_len=m.seq_len
    )


def block_length(cfg: TrainConfig) -> int:
    """The masked-LM block length in tokens: --seq-len, or the preset's."""
    return _shape(cfg)["seq_len"]


def check_config(cfg: TrainConfig) -> None:
    """Contradictory or impossible settings fail before any work."""
    shape = _shape(cfg)
    seq_len = shape["seq_len"]
    rotary = cfg.model.position == "rope"  # no position table: no length limit
    checks = [
        (cfg.optim.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.optim.batch_size}"),
        (cfg.optim.grad_accum >= 1, f"--grad-accum must be >= 1, got {cfg.optim.grad_accum}"),
        (cfg.optim.lr > 0, f"--lr must be > 0, got {cfg.optim.lr}"),
        (
            cfg.run.max_steps is None or cfg.run.max_steps >= 1,
            f"--max-steps must be >= 1, got {cfg.run.max_steps}",
        ),
        (
            cfg.run.time_budget is None or cfg.run.time_budget > 0,
            "--time-budget must be > 0 seconds",
        ),
        (seq_len >= 8, f"--seq-len must be >= 8, got {seq_len}"),
        (
            seq_len <= cfg.model.max_positions or rotary,
            f"--seq-len {seq_len} is larger than the model supports (--max-positions {cfg.model.max_positions})",
        ),
        (
            cfg.data.source_len + cfg.data.target_len <= cfg.model.max_positions or rotary,
            f"--source-len {cfg.data.source_len} + --target-len {cfg.data.target_len} exceeds "
            f"--max-positions {cfg.model.max_positions}",
        ),
        (
            cfg.data.source_len >= 4 and cfg.data.target_len >= 2,
            "--source-len must be >= 4 and --target-len >= 2",
        ),
        (0 < cfg.data.mask_rate < 1, f"--mask-rate must be in (0, 1), got {cfg.data.mask_rate}"),
        (
            0 <= cfg.data.source_mask_rate < 1,
            f"--source-mask-rate must be in [0, 1), got {cfg.data.source_mask_rate}",
        ),
        (0 < cfg.data.gap_ratio < 1, f"--gap-ratio must be in (0, 1), got {cfg.data.gap_ratio}"),
        (
            cfg.data.text_split in ("line", "block", "file"),
            "--text-split must be line, block or file",
        ),
        (
            not (cfg.data.tokenizer and cfg.run.resume),
            "--tokenizer and --resume contradict: a resumed run keeps its own tokenizer",
        ),
    ]
    checks += _init_from_checks(cfg)
    checks += _range_checks(cfg)
    heads = shape["num_heads"]
    if heads >= 1 and shape["hidden_size"] >= 1:
        checks.append(
            (
                shape["hidden_size"] % heads == 0,
                f"hidden_size ({shape['hidden_size']}) must be divisible by num_heads ({heads})",
            )
        )
        checks.append(
            (
                not rotary or (shape["hidden_size"] // heads) % 2 == 0,
                f"--position rope rotates pairs of dimensions: the head size "
                f"({shape['hidden_size'] // heads}) must be even",
            )
        )
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)
    try:
        codecs.lookup(cfg.data.encoding)
    except LookupError:
        raise TrainingError(f"unknown encoding {cfg.data.encoding!r}") from None
    try:
        tasks = pair_tasks(cfg.data.train_pairs)
        check_eval_tasks(tasks, cfg.data.eval_pairs)
    except TaskError as err:
        raise TrainingError(str(err)) from None
    weights = parse_objectives(cfg.run.objectives, available=None, tasks=list(tasks))
    if cfg.data.streaming:
        _check_streaming(cfg, weights)
    _check_patience(cfg)
    if not (cfg.data.tokenizer or cfg.run.resume or cfg.run.init_from):
        check_tokenizer_options(cfg.data.tokenizer_kind, cfg.data.vocab_size)
