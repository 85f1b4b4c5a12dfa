"""Train minituring: masked-word prediction and summarization in one transformer.

    python train.py                                  # tiny preset, embedded corpus, all objectives
    python train.py --preset small --train-text docs/ --train-pairs pairs.jsonl
    python train.py --resume runs/default --max-steps 4000
    torchrun --nproc_per_node 8 train.py --preset base ...

The command line is the configuration: every field of the dataclasses below is a flag, their
docstrings are the --help, and the run's config.json holds them all, so training again from
it reproduces the run.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data.batching import MixtureLoader
from data.objectives import OBJECTIVES
from data.pipeline import DataConfig, build_streams, load_raw
from data.tokenizer import (
    check_compatible,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    train_tokenizer,
)
from model.config import PRESETS, MiniTuringConfig, round_vocab
from model.evaluate import evaluate
from model.transformer import MiniTuringModel

log = logging.getLogger("minituring")

# ---------------------------------------------------------------------------- configuration


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
    """Dropout on embeddings, attention and residual branches."""
    seq_len: int | None = None
    """Masked-LM block length in tokens (default: the preset's)."""
    max_positions: int = 512
    """Longest sequence the model supports (position embeddings)."""


@dataclass
class OptimConfig:
    batch_size: int = 32
    """Micro-batch size per process, in sequences."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (gradients summed; no sync until the last)."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine decay)."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases, norms and embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.98
    clip_grad: float = 1.0
    """Clip the gradient's global norm to this (0: off)."""
    max_bad_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Run folder: config, tokenizer, weights, checkpoints, metrics."""
    resume: str | None = None
    """Continue the run in this folder from its last complete checkpoint."""
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
    max_steps: int = 1200
    """Optimizer steps to train for."""
    time_budget: float | None = None
    """Stop after this many seconds of training; the schedule is fitted to the steps that fit."""
    objectives: str = "auto"
    """Mixture, e.g. masked_lm=1,gap_summary=0.5,summarize=1. auto: every objective with data."""
    log_every: int = 20
    """Steps between metrics.jsonl lines."""
    eval_every: int = 400
    """Steps between evaluations on held-out data (0: only at the end)."""
    eval_batches: int = 8
    """Held-out batches per objective for loss/accuracy."""
    rouge_samples: int = 32
    """Held-out documents summarized (greedy) for ROUGE at each evaluation."""
    save_every: int = 400
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in the run folder."""
    progress: bool = True
    """Show a progress bar."""


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


def parse_objectives(spec: str, available: list[str]) -> dict[str, float]:
    """'masked_lm=1,summarize=0.5' -> weights; 'auto' -> weight 1 for each available one."""
    if spec.strip() == "auto":
        return {name: 1.0 for name in available}
    weights = {}
    for part in spec.split(","):
        name, _, value = part.strip().partition("=")
        if name not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {name!r} in --objectives; expected {', '.join(OBJECTIVES)}"
            )
        try:
            weights[name] = float(value) if value else 1.0
        except ValueError:
            raise ValueError(
                f"--objectives: weight of {name} must be a number, got {value!r}"
            ) from None
    missing = [n for n, w in weights.items() if w > 0 and n not in available]
    if missing:
        need = {"summarize": "document/summary pairs (--train-pairs)"}
        raise ValueError(
            "; ".join(f"objective {n} needs {need.get(n, 'text (--train-text)')}" for n in missing)
        )
    return weights


# ---------------------------------------------------------------------------- CLI


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under a dataclass field) become --help text."""
    docs, tree = {}, ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _arg_type(annotation: str):
    if "list[str]" in annotation:
        return str, "+"
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if annotation.startswith(name):
            return typ, None
    return str, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    for group_field in dataclasses.fields(TrainConfig):
        sub = getattr(defaults, group_field.name)
        group = parser.add_argument_group(group_field.name)
        docs = _field_docs(type(sub))
        for f in dataclasses.fields(sub):
            flag = "--" + f.name.replace("_", "-")
            kwargs = dict(
                dest=f"{group_field.name}.{f.name}",
                default=argparse.SUPPRESS,
                help=docs.get(f.name, " "),
            )
            annotation = str(f.type)
            if annotation == "bool":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
                continue
            typ, nargs = _arg_type(annotation)
            value = getattr(sub, f.name)
            help_default = " (default: %s)" % (value if value not in (None, []) else "none")
            kwargs["help"] += help_default
            group.add_argument(flag, type=typ, nargs=nargs, metavar=f.name.upper(), **kwargs)
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags. With --resume, the run's saved config is the base and flags override it."""
    args = vars(build_parser().parse_args(argv))
    overrides: dict[str, dict] = {}
    for key, value in args.items():
        group, name = key.split(".")
        overrides.setdefault(group, {})[name] = value
    base = {}
    resume = overrides.get("run", {}).get("resume")
    if resume:
        config_file = Path(resume) / "config.json"
        if not config_file.is_file():
            raise SystemExit(f"error: --resume {resume}: no config.json there (not a run folder?)")
        base = json.loads(config_file.read_text()).get("training", {})
    merged = {
        g: {**base.get(g, {}), **overrides.get(g, {})} for g in ("model", "data", "optim", "run")
    }
    if resume:
        merged["run"]["output_dir"] = resume
    return TrainConfig.from_dict(merged)


# ---------------------------------------------------------------------------- environment


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _bf16_faster_on_cpu() -> bool:
    """Time a matmul in fp32 and under bf16 autocast; CPUs with AMX/AVX512-BF16 win by far."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)

    def bench(enabled: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            torch.mm(a, b)
            start = time.perf_counter()
            for _ in range(20):
                torch.mm(a, b)
        return time.perf_counter() - start

    return bench(True) * 1.3 < bench(False)


def setup_env(run: RunConfig) -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(
                f"error: --device {run.device} asks for CUDA, but no CUDA device is available"
            )
        device = torch.device(want if ":" in want else f"cuda:{local}")
        torch.cuda.set_device(device)
    elif want == "cpu":
        device = torch.device("cpu")
    else:
        raise SystemExit(f"error: --device must be auto, cpu, cuda or cuda:N, got {run.device!r}")
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if run.precision not in ("auto", "fp32", "bf16"):
        raise SystemExit(f"error: --precision must be auto, fp32 or bf16, got {run.precision!r}")
    if run.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: --precision bf16: this GPU does not support bfloat16")
    if run.precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        bf16 = bf16 or (device.type == "cpu" and _bf16_faster_on_cpu())
    else:
        bf16 = run.precision == "bf16"
    return Env(device, torch.bfloat16 if bf16 else None, rank, world, local)


def autocast(env: Env):
    if env.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=env.dtype)


# ---------------------------------------------------------------------------- wrapping


def wrap_model(model: torch.nn.Module, env: Env) -> torch.nn.Module:
    """The one place where the plain model becomes the trained one (DDP here), so
    ``model/`` stays free of parallelism."""
    model.to(env.device)
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, env: Env) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Matrices decay; biases, norms and embeddings (position and tied token) do not.
        (
            decay if p.dim() == 2 and "embed" not in name and "position" not in name else no_decay
        ).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel exists for CPU and CUDA; on CPU it is hundreds of times faster than the
    # default per-parameter loop, which otherwise dominates a small model's step.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-6, fused=True)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at ``total``."""
    warmup = min(cfg.warmup_steps, max(total // 10, 1))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


# ---------------------------------------------------------------------------- run folder


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        str(tmp),
        metadata={"format": "pt"},
    )
    os.chmod(tmp, 0o644)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores everything a run needs, atomically.

    Layout (a Hugging Face model folder plus the trainer's state)::

        RUN/config.json  tokenizer.json  tokenizer_config.json  model.safetensors  metrics.jsonl
        RUN/checkpoints/step-0000400/{model.safetensors, optimizer.pt, state.json}
        RUN/checkpoints/latest        name of the newest complete checkpoint

    A checkpoint is written under a temporary name and renamed when complete, then ``latest``
    is switched; a crash at any point leaves the previous one whole. Weights are safetensors;
    the optimizer is loaded with ``weights_only=True``: opening a run never executes code.
    """

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep = folder, max(keep, 1)
        self.dir = folder / "checkpoints"

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        return path if (path / "state.json").is_file() else None

    def save(self, model: MiniTuringModel, optimizer, state: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{state['step']:07d}"
        tmp = self.dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = model.state_dict()
        _save_weights(weights, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(rng, tmp / "rng.pt")
        _atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
        final = self.dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        _atomic_write_text(self.dir / "latest", name)
        # The folder's own model.safetensors is the newest weights, for inference.
        _save_weights(weights, self.folder / "model.safetensors")
        self._prune(keep_name=name)
        return final

    def _prune(self, keep_name: str) -> None:
        done = sorted(p for p in self.dir.glob("step-*") if p.is_dir())
        for old in done[: -self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, model: MiniTuringModel, optimizer) -> dict:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return json.loads((path / "state.json").read_text())


class Metrics:
    """metrics.jsonl, appended by the main process; on resume, lines past the checkpoint's
    step (logged before a crash) are dropped so the file matches the resumed run."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            _atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------- the loop


class StopSignal:
    """SIGTERM / SIGINT (pre-emption, Ctrl-C): finish the step, checkpoint, exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _unwrap(model: torch.nn.Module) -> MiniTuringModel:
    return getattr(model, "module", model)


def _all_reduce_sum(value: torch.Tensor, env: Env) -> torch.Tensor:
    if env.distributed:
        torch.distributed.all_reduce(value)
    return value


def build_model_config(cfg: TrainConfig, tokenizer) -> MiniTuringConfig:
    opts = cfg.model
    if opts.preset not in PRESETS:
        raise SystemExit(
            f"error: unknown --preset {opts.preset!r}; expected one of {', '.join(PRESETS)}"
        )
    shape = PRESETS[opts.preset]()
    shape.pop("seq_len")
    for key in ("hidden_size", "num_layers", "num_heads", "ffn_size"):
        if getattr(opts, key) is not None:
            shape[key] = getattr(opts, key)
    ids = special_ids(tokenizer)
    return MiniTuringConfig(
        **shape,
        vocab_size=round_vocab(len(tokenizer)),
        tokenizer_size=len(tokenizer),
        max_position_embeddings=opts.max_positions,
        dropout=opts.dropout,
        pad_token_id=ids.pad,
        unk_token_id=ids.unk,
        bos_token_id=ids.cls,
        eos_token_id=ids.sep,
        mask_token_id=ids.mask,
        sentence_mask_token_id=ids.sentence_mask,
        preset=opts.preset,
    )


def validate(cfg: TrainConfig) -> int:
    """Contradictory or impossible settings fail before any work; returns the block length."""
    seq_len = cfg.model.seq_len or PRESETS.get(cfg.model.preset, PRESETS["tiny"])()["seq_len"]
    checks = [
        (cfg.optim.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.optim.batch_size}"),
        (cfg.optim.grad_accum >= 1, f"--grad-accum must be >= 1, got {cfg.optim.grad_accum}"),
        (cfg.optim.lr > 0, f"--lr must be > 0, got {cfg.optim.lr}"),
        (cfg.run.max_steps >= 1, f"--max-steps must be >= 1, got {cfg.run.max_steps}"),
        (
            cfg.run.time_budget is None or cfg.run.time_budget > 0,
            "--time-budget must be > 0 seconds",
        ),
        (seq_len >= 8, f"--seq-len must be >= 8, got {seq_len}"),
        (
            seq_len <= cfg.model.max_positions,
            f"--seq-len {seq_len} is larger than the model supports (--max-positions {cfg.model.max_positions})",
        ),
        (
            cfg.data.source_len + cfg.data.target_len <= cfg.model.max_positions,
            f"--source-len {cfg.data.source_len} + --target-len {cfg.data.target_len} exceeds "
            f"--max-positions {cfg.model.max_positions}",
        ),
        (
            cfg.data.source_len >= 4 and cfg.data.target_len >= 2,
            "--source-len must be >= 4 and --target-len >= 2",
        ),
        (0 < cfg.data.mask_rate < 1, f"--mask-rate must be in (0, 1), got {cfg.data.mask_rate}"),
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
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")
    return seq_len


def train(cfg: TrainConfig) -> Path:
    """Run training as configured; returns the run folder."""
    seq_len = validate(cfg)
    env = setup_env(cfg.run)
    out = Path(cfg.run.output_dir)
    resuming = cfg.run.resume is not None
    if env.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise SystemExit(
                f"error: cannot write to output folder {out}: {err.strerror}"
            ) from None
        if not resuming and (out / "checkpoints" / "latest").exists():
            raise SystemExit(
                f"error: {out} already holds a run; continue it with --resume {out} "
                "or choose another --output-dir"
            )
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)

    # Data and tokenizer.
    t0 = time.perf_counter()
    raw = load_raw(cfg.data)
    if resuming:
        tokenizer = load_tokenizer(out)
    elif cfg.data.tokenizer:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    else:
        tokenizer = train_tokenizer(
            raw.train_texts + [d for d, _ in raw.train_pairs],
            kind=cfg.data.tokenizer_kind,
            vocab_size=cfg.data.vocab_size,
        )
    available = [n for n in OBJECTIVES if raw.has(n)]
    weights = parse_objectives(cfg.run.objectives, available)
    objectives = [n for n, w in weights.items() if w > 0]
    model_config = build_model_config(cfg, tokenizer)
    streams = build_streams(raw, tokenizer, cfg.data, objectives, seq_len, model_config.vocab_size)
    data_seconds = time.perf_counter() - t0

    model = MiniTuringModel(model_config)
    if resuming:
        saved = MiniTuringConfig.from_pretrained(out)
        check_compatible(tokenizer, saved, where=str(out))
    wrapped = wrap_model(model, env)
    optimizer = make_optimizer(model, cfg.optim, env)
    loader = MixtureLoader(
        streams.train,
        weights,
        cfg.optim.batch_size,
        cfg.run.seed,
        rank=env.rank,
        world_size=env.world_size,
    )
    ckpt = Checkpointer(out, cfg.run.keep_checkpoints)
    state = {"step": 0, "tokens": 0, "planned_steps": None, "bad_steps": 0, "elapsed": 0.0}
    if resuming:
        latest = ckpt.latest()
        if latest is None:
            raise SystemExit(
                f"error: --resume {out}: no complete checkpoint in {out / 'checkpoints'}"
            )
        state = ckpt.load(latest, model, optimizer)
        loader.load_state_dict(state["data"])
    if env.main and not resuming:
        model_config.training = cfg.to_dict()
        model_config.save_pretrained(out)
        save_tokenizer(tokenizer, out)
    metrics = Metrics(out / "metrics.jsonl", env.main, state["step"] if resuming else None)

    global_batch = cfg.optim.batch_size * cfg.optim.grad_accum * env.world_size
    if env.main:
        n_params = sum(p.numel() for p in model.parameters())
        precision = "bf16 autocast" if env.dtype else "fp32"
        print(
            f"model: {cfg.model.preset}, {n_params / 1e6:.1f}M parameters | device {env.device} x{env.world_size}, "
            f"{precision}\ndata: {raw.description} (prepared in {data_seconds:.0f}s)\n"
            f"objectives: {', '.join(f'{n}={w:g}' for n, w in weights.items())} | "
            f"{streams.describe()}\n"
            f"global batch {global_batch} sequences = {cfg.optim.batch_size} x {cfg.optim.grad_accum} "
            f"accumulation x {env.world_size} processes; block {seq_len} tokens"
            + (f"\nresuming from step {state['step']}" if resuming else ""),
            flush=True,
        )

    stop = StopSignal()
    try:
        reason = _loop(
            cfg,
            env,
            model,
            wrapped,
            optimizer,
            loader,
            streams,
            tokenizer,
            ckpt,
            metrics,
            state,
            stop,
        )
    finally:
        stop.restore()
    if env.main:
        print(reason, flush=True)
        write_samples(out, raw.eval_pairs)
    if env.distributed:
        torch.distributed.barrier()
    return out


def _loop(
    cfg, env, model, wrapped, optimizer, loader, streams, tokenizer, ckpt, metrics, state, stop
) -> str:
    run, optim = cfg.run, cfg.optim
    total = state["planned_steps"] or run.max_steps
    start_step = state["step"]
    bar = tqdm(
        total=total,
        initial=start_step,
        disable=not (env.main and run.progress),
        dynamic_ncols=True,
        unit="step",
    )
    window = {"tokens": 0, "time": 0.0, "data": 0.0, "losses": {}}
    clock = time.perf_counter()
    elapsed_before = state["elapsed"]
    reason = "done"

    def checkpoint() -> None:
        state["data"] = loader.state_dict()
        state["elapsed"] = elapsed_before + time.perf_counter() - clock
        if env.main:
            ckpt.save(model, optimizer, state)
        if env.distributed:
            torch.distributed.barrier()

    while state["step"] < total:
        step = state["step"]
        t_step = time.perf_counter()
        batches = [loader.next_batch() for _ in range(optim.grad_accum)]
        t_data = time.perf_counter() - t_step
        # Normalise by the label tokens of the whole global batch, so N processes x b equal
        # one process x N*b and accumulation equals a bigger batch exactly.
        counts = torch.tensor([float((b["labels"] != -100).sum()) for _, b in batches]).sum()
        global_count = _all_reduce_sum(counts.to(env.device), env).clamp(min=1)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, optim)
        step_losses: dict[str, list[float]] = {}
        for i, (name, batch) in enumerate(batches):
            batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
            sync = i == len(batches) - 1 or not env.distributed
            ctx = contextlib.nullcontext() if sync else wrapped.no_sync()
            with ctx:
                with autocast(env):
                    out = wrapped(**batch)
                loss = out.loss * out.num_label_tokens / global_count * env.world_size
                loss.backward()
            step_losses.setdefault(name, []).append(float(out.loss.detach()))
            window["tokens"] += int(batch["input_ids"].numel()) * env.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), optim.clip_grad if optim.clip_grad > 0 else float("inf")
        )
        finite = math.isfinite(float(grad_norm)) and all(
            math.isfinite(v) for vs in step_losses.values() for v in vs
        )
        if finite:
            optimizer.step()
            state["bad_steps"] = 0
        else:
            state["bad_steps"] += 1
            state["skipped_steps"] = state.get("skipped_steps", 0) + 1
            if env.main:
                tqdm.write(f"step {step}: non-finite loss or gradient, step skipped")
            if state["bad_steps"] >= optim.max_bad_steps:
                optimizer.zero_grad(set_to_none=True)
                return (
                    f"stopped: {state['bad_steps']} consecutive steps with a non-finite loss or gradient; "
                    f"the last good checkpoint in {ckpt.dir} is intact (try a lower --lr)"
                )
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        state["tokens"] += sum(int(b["input_ids"].numel()) for _, b in batches) * env.world_size
        for name, vs in step_losses.items():
            window["losses"].setdefault(name, []).extend(vs)
        now = time.perf_counter()
        window["time"] += now - t_step
        window["data"] += t_data
        elapsed = elapsed_before + now - clock

        # A time budget fixes the schedule's length once the speed is known (saved, so a
        # resumed run keeps the same schedule).
        if run.time_budget and state["planned_steps"] is None and state["step"] == min(20, total):
            per_step = (now - clock) / max(state["step"] - start_step, 1)
            total = max(state["step"], min(run.max_steps, int(run.time_budget / per_step)))
            state["planned_steps"] = total
            bar.total = total
            bar.refresh()

        bar.update(1)
        if state["step"] % run.log_every == 0 or state["step"] == total:
            record = {
                "step": state["step"],
                "lr": optimizer.param_groups[0]["lr"],
                "tokens": state["tokens"],
                "tokens_per_s": window["tokens"] / max(window["time"], 1e-9),
                "data_wait": window["data"] / max(window["time"], 1e-9),
                "grad_norm": float(grad_norm),
                "elapsed": elapsed,
            }
            for name, vs in window["losses"].items():
                record[f"loss/{name}"] = float(np.mean(vs))
            metrics.write(record)
            shown = {
                k.split("/")[1][:4]: f"{v:.3f}" for k, v in record.items() if k.startswith("loss/")
            }
            bar.set_postfix(**shown, tok_s=f"{record['tokens_per_s']:.0f}")
            window = {"tokens": 0, "time": 0.0, "data": 0.0, "losses": {}}

        last = state["step"] == total
        if run.eval_every and state["step"] % run.eval_every == 0 and not last:
            _evaluate(cfg, env, model, streams, tokenizer, metrics, state)
        if stop.received is not None:
            checkpoint()
            bar.close()
            return (
                f"stopped by signal {stop.received} at step {state['step']}; checkpoint saved. "
                f"Continue with: python train.py --resume {cfg.run.output_dir}"
            )
        if run.save_every and state["step"] % run.save_every == 0 and not last:
            checkpoint()
        if run.time_budget and elapsed >= run.time_budget and not last:
            total = state["step"]
            reason = f"time budget of {run.time_budget:g}s reached at step {total}"
    bar.close()
    _evaluate(cfg, env, model, streams, tokenizer, metrics, state)
    checkpoint()
    return f"{reason}: {state['step']} steps, {state['tokens']:,} tokens; run folder {cfg.run.output_dir}"


def _evaluate(cfg, env, model, streams, tokenizer, metrics, state) -> dict:
    if not env.main:
        if env.distributed:
            torch.distributed.barrier()
        return {}
    with autocast(env):
        results = evaluate(
            model,
            tokenizer,
            streams.eval,
            batch_size=cfg.optim.batch_size,
            max_batches=cfg.run.eval_batches,
            rouge_samples=cfg.run.rouge_samples,
        )
    record = {"step": state["step"], **{f"eval/{k}": v for k, v in results.items()}}
    metrics.write(record)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items())
    tqdm.write(f"eval @ step {state['step']}: {shown}")
    if env.distributed:
        torch.distributed.barrier()
    return results


# ---------------------------------------------------------------------------- main


SAMPLE_MASKS = (
    "Return the [MASK] value of a number.",
    "Raise a [MASK] if the file does not exist.",
    "The list is [MASK] in place.",
)


def write_samples(folder: Path, eval_pairs: list[tuple[str, str]]) -> dict:
    """Fill-mask predictions and one held-out document's summary, saved as samples.json."""
    import model as api

    lm = api.load(folder)
    samples: dict = {"fill_mask": [], "summary": None}
    for text in SAMPLE_MASKS:
        best = lm.fill_mask(text, top_k=3)
        samples["fill_mask"].append(
            {"text": text, "predictions": [[p["token"].strip(), p["score"]] for p in best]}
        )
    if eval_pairs:
        document, reference = eval_pairs[0]
        generated = lm.summarize(document, max_new_tokens=32, num_beams=4)
        samples["summary"] = {"document": document, "reference": reference, "generated": generated}
    _atomic_write_text(folder / "samples.json", json.dumps(samples, indent=1))
    return samples


def print_samples(samples: dict) -> None:
    """What the README's first command ends with: a few fill-masks and a held-out summary."""
    print("\nfill-mask:")
    for item in samples["fill_mask"]:
        shown = ", ".join(f"{token} ({score:.2f})" for token, score in item["predictions"])
        print(f"  {item['text']}\n    -> {shown}")
    summary = samples.get("summary")
    if summary:
        doc = summary["document"]
        short = doc if len(doc) < 400 else doc[:400] + " ..."
        print(f"\nheld-out document:\n  {short}")
        print(f"reference summary:\n  {summary['reference']}")
        print(f"generated summary:\n  {summary['generated']}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(argv)
    try:
        folder = train(cfg)
    except (ValueError, OSError) as err:
        # Data and configuration errors carry their own explanation (file, record, expectation).
        raise SystemExit(f"error: {err}") from None
    samples = folder / "samples.json"
    if int(os.environ.get("RANK", "0")) == 0 and samples.is_file():
        print_samples(json.loads(samples.read_text()))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
