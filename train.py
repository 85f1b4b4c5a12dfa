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
import pickle
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data.batching import MixtureLoader, Seq2SeqStream
from data.objectives import OBJECTIVES
from data.pipeline import DataConfig, build_streams, load_raw
from data.tokenizer import (
    check_compatible,
    load_tokenizer,
    model_config,
    save_tokenizer,
    train_tokenizer,
)
from model.config import PRESETS, MiniTuringConfig
from model.evaluate import EVAL_SEED, evaluate
from model.hf import save_remote_code
from model.transformer import IGNORE_INDEX, MiniTuringModel
from trainer.lock import RunFolderLocked, hold_run_folder

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


def parse_objectives(spec: str, available: list[str]) -> dict[str, float]:
    """'masked_lm=1,summarize=0.5' -> weights; 'auto' -> weight 1 for each available one."""
    if spec.strip() == "auto":
        if not available:
            raise ValueError(
                "no training data left: every document was held out for evaluation "
                "(use more data, a smaller --eval-fraction, or --eval-text / --eval-pairs)"
            )
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
        if not (math.isfinite(weights[name]) and weights[name] >= 0):
            raise ValueError(
                f"--objectives: weight of {name} must be a finite number >= 0, got {value!r}"
            )
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"--objectives {spec!r}: at least one objective needs a weight > 0")
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
    strategy: str = "none"  # none, ddp or fsdp: --strategy resolved against the world size

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _bf16_faster_on_cpu() -> bool:
    """Whether this CPU multiplies bf16 matrices much faster than fp32 ones (AMX, AVX512-BF16).

    Rounds alternate between the two and the best round of each counts, so other processes
    stealing cores for part of the probe do not decide the outcome; where bf16 units exist the
    gap is tens of times, far beyond the 2x asked for.
    """
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}

    def bench(dtype: torch.dtype) -> float:
        x, y = pairs[dtype]
        torch.mm(x, y)
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(x, y)
        return time.perf_counter() - start

    best = dict.fromkeys(pairs, float("inf"))
    for _ in range(5):
        for dtype in pairs:
            best[dtype] = min(best[dtype], bench(dtype))
    return best[torch.bfloat16] * 2 < best[torch.float32]


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
        _check_cuda_placement(run.device, want, local)
        device = torch.device(want if ":" in want else f"cuda:{local}")
        torch.cuda.set_device(device)
    elif want == "cpu":
        device = torch.device("cpu")
    else:
        raise SystemExit(f"error: --device must be auto, cpu, cuda or cuda:N, got {run.device!r}")
    strategy = _resolve_strategy(run.strategy, world)
    if run.compile:
        _check_compiler(device)
    _init_process_group(device, world, strategy)
    if run.precision not in ("auto", "fp32", "bf16"):
        raise SystemExit(f"error: --precision must be auto, fp32 or bf16, got {run.precision!r}")
    if run.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: --precision bf16: this GPU does not support bfloat16")
    if run.precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        bf16 = bf16 or (device.type == "cpu" and _bf16_faster_on_cpu())
    else:
        bf16 = run.precision == "bf16"
    if world > 1 and run.precision == "auto" and device.type == "cpu":
        # Each process timed its own matmuls; all must train in the same precision.
        vote = torch.tensor([int(bf16)])
        torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MIN)
        bf16 = bool(vote.item())
    return Env(device, torch.bfloat16 if bf16 else None, rank, world, local, strategy)


def _check_cuda_placement(flag: str, want: str, local_rank: int) -> None:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if ":" in want and local_world > 1:
        raise SystemExit(
            f"error: --device {flag} puts all {local_world} processes of this machine on one "
            "GPU; use --device cuda (process i takes cuda:LOCAL_RANK)"
        )
    if ":" not in want and local_rank >= torch.cuda.device_count():
        raise SystemExit(
            f"error: LOCAL_RANK {local_rank} needs GPU {local_rank}, but only "
            f"{torch.cuda.device_count()} are visible; lower --nproc_per_node"
        )


def _resolve_strategy(flag: str, world: int) -> str:
    """auto: DDP when several processes, nothing with one. FSDP on one process is allowed (the
    sharded code path and its bf16 policy on a single GPU); DDP of one replica is the plain model."""
    if flag not in ("auto", "ddp", "fsdp"):
        raise SystemExit(f"error: --strategy must be auto, ddp or fsdp, got {flag!r}")
    if flag == "fsdp":
        if not torch.distributed.is_available():
            raise SystemExit("error: --strategy fsdp: this PyTorch build has no torch.distributed")
        return "fsdp"
    return "ddp" if world > 1 else "none"


def _check_compiler(device: torch.device) -> None:
    """torch.compile's code generator needs Triton for GPUs and a C++ compiler for CPUs."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise SystemExit("error: --compile on GPU needs Triton (pip install triton)")
        return
    compilers = [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
    if not any(c and shutil.which(c) for c in compilers):
        raise SystemExit(
            "error: --compile on CPU needs a C++ compiler (g++ or clang++, or set CXX); "
            "install one or drop --compile"
        )


def _init_process_group(device: torch.device, world: int, strategy: str) -> None:
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        torch.distributed.init_process_group(backend=backend)
    elif strategy == "fsdp":
        # FSDP needs a process group even alone; a one-member group needs no launcher.
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)


def autocast(env: Env):
    if env.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=env.dtype)


# ---------------------------------------------------------------------------- wrapping


def wrap_model(
    model: MiniTuringModel,
    env: Env,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> torch.nn.Module:
    """The one place where the plain model becomes the trained one, so ``model/`` stays free of
    parallelism. In torchtitan's order: activation checkpointing per block, then compilation
    per block, then data parallelism (DDP, or FSDP2 per block plus the root).

    Returns what the loop calls. Under FSDP that is ``model`` itself, whose parameters are now
    sharded DTensors; under DDP it is the DDP wrapper around ``model``.
    """
    model.to(env.device)
    if activation_checkpointing:
        _checkpoint_blocks(model)
    if compile:
        for block in model.blocks:
            block.compile()
    if env.strategy == "fsdp":
        return _fully_shard(model, env)
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def _checkpoint_blocks(model: MiniTuringModel) -> None:
    """Each block's forward runs under torch.utils.checkpoint while gradients are recorded:
    only its input is kept, and the block is recomputed in the backward pass. Replacing the
    forward (instead of wrapping the module) keeps parameter names, so checkpoints are the same
    with and without it."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:

        def recomputed(*args, _forward=block.forward, **kwargs):
            if not torch.is_grad_enabled():  # evaluation and decoding: nothing to save
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = recomputed


def _fully_shard(model: MiniTuringModel, env: Env) -> MiniTuringModel:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 weights for compute and all-gathers, fp32 for the gradient reduce-scatter and the
    # sharded master weights the optimizer updates.
    policy = MixedPrecisionPolicy(
        param_dtype=env.dtype, reduce_dtype=torch.float32 if env.dtype else None
    )
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    # The root owns what is left: position and token embeddings and the final norm. The tied
    # output layer reads embed.weight inside the root's forward, so it is gathered there too.
    fully_shard(model, mp_policy=policy)
    return model


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_sync(wrapped: torch.nn.Module):
    """Context for a non-final micro-step: gradients accumulate locally and the all-reduce
    (DDP) or reduce-scatter (FSDP) waits for the last micro-step of the optimizer step."""
    if _is_fsdp(wrapped):
        return _fsdp_no_sync(wrapped)
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


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


def _fsync_files(folder: Path) -> None:
    """Flush every file under ``folder`` to disk, so that once the folder is renamed into place
    its contents survive a power cut too, not only a crash."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _checkpoint_step(path: Path) -> int:
    """The step of a ``step-N`` checkpoint folder (numerically: names may outgrow the padding)."""
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


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
        RUN/checkpoints/step-0000400/{dcp/, state.json}   under FSDP: sharded weights + optimizer
        RUN/checkpoints/latest        name of the newest complete checkpoint

    A checkpoint is written under a temporary name and renamed when complete, then ``latest``
    is switched; a crash at any point leaves the previous one whole. Weights are safetensors;
    the optimizer is loaded with ``weights_only=True``: opening a run never executes code.
    """

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep = folder, max(keep, 1)
        self.dir = folder / "checkpoints"

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names; if the pointer is missing or names no complete
        checkpoint (a crash between renaming the first checkpoint and writing the pointer),
        the newest complete ``step-*`` folder: a folder gets that name only once complete."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if path.name.startswith("step-") and (path / "state.json").is_file():
                return path
        complete = [p for p in self.dir.glob("step-*") if (p / "state.json").is_file()]
        return max(complete, key=_checkpoint_step) if complete else None

    def save(self, model: MiniTuringModel, optimizer, state: dict) -> Path:
        """Called on every rank. A replicated model (one process, DDP) is written by rank 0
        alone; a sharded one (FSDP) by all ranks together (see ``_save_sharded``)."""
        if _is_fsdp(model):
            return self._save_sharded(model, optimizer, state)
        if _rank() != 0:
            return self.dir / f"step-{state['step']:07d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{state['step']:07d}"
        tmp = self.dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = model.state_dict()
        _save_weights(weights, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        return self._publish(tmp, name, weights, state)

    def _publish(self, tmp: Path, name: str, weights: dict, state: dict) -> Path:
        """Rank 0's part of every save, once the weights and optimizer are in ``tmp``: add the
        RNG and JSON state, flush, rename into place, switch ``latest``, export the weights for
        inference, prune."""
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(rng, tmp / "rng.pt")
        _atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
        _fsync_files(tmp)
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

    def _save_sharded(self, model, optimizer, state: dict) -> Path:
        """FSDP: every rank writes its own shards of the weights and optimizer state with
        torch.distributed.checkpoint into ``step-N/dcp/``, so no process ever holds the whole
        model or optimizer; rank 0 then adds the JSON state and renames the folder. Only the
        inference export (``RUN/model.safetensors``) is gathered, onto rank 0's CPU."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"step-{state['step']:07d}"
        tmp, final = self.dir / f".{name}.tmp", self.dir / name
        main = _rank() == 0
        if main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "dcp").mkdir(parents=True)
        torch.distributed.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
        weights = full_state_dict(model)  # collective: every rank takes part
        if main:
            self._publish(tmp, name, weights, state)
        torch.distributed.barrier()
        return final

    def _prune(self, keep_name: str) -> None:
        """Keep the newest ``keep`` checkpoints up to ``keep_name`` (complete, and named by
        ``latest`` by now). Later ones belong to a history abandoned when the run was resumed
        from an earlier checkpoint; they go too."""
        done = sorted((p for p in self.dir.glob("step-*") if p.is_dir()), key=_checkpoint_step)
        newest = _checkpoint_step(self.dir / keep_name)
        behind = [p for p in done if _checkpoint_step(p) <= newest]
        ahead = [p for p in done if _checkpoint_step(p) > newest]
        for old in behind[: -self.keep] + ahead:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, model: MiniTuringModel, optimizer) -> dict:
        """Restore into ``model`` (plain, DDP's inner module, or FSDP) whatever wrote ``path``:
        a sharded checkpoint is resharded to this run's ranks, a plain one is sharded on load."""
        if (path / "dcp").is_dir():
            check_sharded_metadata(path / "dcp")
            with _sharded_load_errors(path / "dcp"):
                _load_sharded(path / "dcp", model, optimizer)
        elif _is_fsdp(model):
            _load_plain_into_fsdp(path, model, optimizer)
        else:
            model.load_state_dict(read_weights(path / "model.safetensors", model))
            _load_optimizer(optimizer, read_pickled(path / "optimizer.pt"), path / "optimizer.pt")
        rng = read_pickled(path / "rng.pt")
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            # A run saved on a box of 8 GPUs may resume on a machine with fewer.
            for i, cuda_state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, i)
        return read_state(path / "state.json")


# ---------------------------------------------------------------------------- distributed state


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain, full weights on CPU (the safetensors export). Under FSDP this gathers the shards
    onto rank 0's CPU one tensor at a time and is a collective: every rank must call it; the
    other ranks get an empty dict."""
    if not _is_fsdp(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _load_sharded(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """Load a torch.distributed.checkpoint folder into this run's model and optimizer, whatever
    the number of ranks that wrote it: DCP reshards on load, into DTensors under FSDP or into
    plain tensors for one process or DDP (where every rank reads the whole state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    single = not torch.distributed.is_initialized()
    with warnings.catch_warnings():
        # One plain process reads every shard itself, which is what is meant here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=single, planner=safe_load_planner())
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def _load_plain_into_fsdp(path: Path, model: torch.nn.Module, optimizer) -> None:
    """A single-process or DDP checkpoint resumed under FSDP: every rank reads the full state and
    keeps its own shard. The optimizer's state is keyed by parameter index; this run's optimizer
    holds the same parameters in the same order (``make_optimizer``), which gives their names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = read_pickled(path / "optimizer.pt")
    optim_state = {
        "state": {order[int(i)]: s for i, s in saved["state"].items()},
        "param_groups": [
            {**g, "params": [order[int(i)] for i in g["params"]]} for g in saved["param_groups"]
        ],
    }
    set_state_dict(
        model,
        optimizer,
        model_state_dict=read_weights(path / "model.safetensors"),
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True),
    )


class Metrics:
    """metrics.jsonl, appended by the main process; on resume, lines past the checkpoint's
    step (logged before a crash) are dropped so the file matches the resumed run."""

    def __init__(
        self, path: Path, enabled: bool, resume_step: int | None, report_to: str = "none"
    ) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if _logged_by(line, resume_step)]
            _atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif enabled and resume_step is None and path.exists():
            # A fresh start in a folder whose earlier attempt never completed a checkpoint:
            # what it logged belongs to no run.
            path.unlink()
        self.tensorboard = (
            TensorBoardWriter(path.parent / "tensorboard", resume_step)
            if enabled and report_to == "tensorboard"
            else None
        )

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


# ---------------------------------------------------------------------------- reporting
# --report-to, the end-of-training plot and the time estimate: ways to look at a run.

REPORT_TO = ("none", "tensorboard")
TENSORBOARD_EXTRA = 'pip install -e ".[tensorboard]"'
ETA_AFTER_STEPS = 20


def check_report_to(report_to: str) -> None:
    """Fail before any work when --report-to names an unknown target or a missing package."""
    if report_to not in REPORT_TO:
        raise SystemExit(
            f"error: --report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}"
        )
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise SystemExit(
                f"error: --report-to tensorboard needs the tensorboard package: {TENSORBOARD_EXTRA}"
            ) from None


class TensorBoardWriter:
    """The metrics.jsonl records as TensorBoard scalars in RUN/tensorboard. Keys keep their
    names (loss/masked_lm, eval/summarize/rouge1, ...); lone ones go under train/ (train/lr)."""

    def __init__(self, folder: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events past the checkpoint (logged before a crash) are hidden, as
        # Metrics drops those lines from metrics.jsonl.
        purge_step = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        self.writer.flush()  # records are rare (every --log-every steps); never lose one

    def close(self) -> None:
        self.writer.close()


def write_training_curves(folder: Path) -> None:
    """RUN/training_curves.png from metrics.jsonl. A finished run never fails for its plot."""
    from model.plot import plot_run

    try:
        path = plot_run(folder)
    except Exception as err:  # matplotlib missing (the message names the extra), or a bad file
        print(f"training curves not drawn: {err}; later: python -m model plot {folder}")
        return
    print(f"training curves: {path}", flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def eta_line(steps_done: int, seconds: float, step: int, total: int) -> str:
    """One line once the speed is known: time per step and the time left to ``total``."""
    per_step = seconds / max(steps_done, 1)
    return (
        f"speed: {per_step:.3g} s/step over {steps_done} steps; about "
        f"{_duration(per_step * (total - step))} to finish {total:,} steps "
        "(evaluations and checkpoints not included)"
    )


# ---------------------------------------------------------------------------- faults
# Reading a checkpoint never runs code and names the file at fault; writing one never stores
# non-finite weights, and a failed write (disk full) leaves nothing half-written behind.


def read_weights(path: Path, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file, checked against ``model``'s parameter names and shapes."""
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: the checkpoint is incomplete")
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise SystemExit(
            f"error: {path} is not a valid safetensors file ({err}); weights are only ever read "
            "from safetensors"
        ) from None
    if model is not None:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        problems = [f"{k} is missing" for k in expected if k not in weights]
        problems += [f"unexpected {k}" for k in weights if k not in expected]
        problems += [
            f"{k} has shape {tuple(weights[k].shape)}, the model has {shape}"
            for k, shape in expected.items()
            if k in weights and tuple(weights[k].shape) != shape
        ]
        if problems:
            raise SystemExit(
                f"error: {path} does not fit this run's model: " + "; ".join(problems[:5])
            )
    return weights


def read_pickled(path: Path):
    """``torch.load`` restricted to tensors and plain containers (``weights_only``): whatever
    a checkpoint file holds, opening it never executes code."""
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: the checkpoint is incomplete")
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).splitlines()
        why = next((line.strip() for line in lines if "Unsupported" in line), None)
        if why is None:
            raise SystemExit(f"error: cannot read {path}: {lines[0] if lines else err}") from None
        raise SystemExit(
            f"error: refused to load {path}: it holds more than tensors and plain containers "
            f"({why}); checkpoints are read with torch.load(weights_only=True) and never run code"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise SystemExit(f"error: cannot read {path}: {str(err).splitlines()[0]}") from None


def read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read {path}: {err}") from None


def _load_optimizer(optimizer, state: dict, path: Path) -> None:
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"error: {path} does not fit this run's optimizer ({err})") from None


def _logged_by(line: str, step: int) -> bool:
    """Whether a metrics line belongs to the run up to ``step``; a line torn by a crash does not."""
    try:
        return json.loads(line).get("step", 0) <= step
    except json.JSONDecodeError:
        return False


def _intact(ckpt: Checkpointer) -> str:
    latest = ckpt.latest()
    if latest is None:
        return "No checkpoint of this run is complete yet."
    return f"The last complete checkpoint, {latest.name} in {ckpt.dir}, is intact."


def _non_finite_weights(model: torch.nn.Module, env: Env) -> list[str]:
    """Names of parameters holding NaN or infinity (on this process's shard), agreed by all."""
    bad = []
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    if env.distributed:
        count = torch.tensor([len(bad)], device=env.device)
        torch.distributed.all_reduce(count)
        if int(count) and not bad:
            bad = ["parameters on another process"]
    return bad


def save_checkpoint(ckpt: Checkpointer, model, optimizer, state: dict, env: Env) -> None:
    """``ckpt.save``, refusing non-finite weights; a write that fails (disk full, a folder
    turned read-only) removes its partial files and says which checkpoint is intact."""
    name = f"step-{state['step']:07d}"
    bad = _non_finite_weights(model, env)
    if bad:
        raise SystemExit(
            f"error: the weights are not finite after step {state['step']} "
            f"({', '.join(bad[:3])}); they were not saved. {_intact(ckpt)} "
            "Try a lower --lr or --clip-grad."
        )
    try:
        ckpt.save(model, optimizer, state)
    except OSError as err:
        shutil.rmtree(ckpt.dir / f".{name}.tmp", ignore_errors=True)
        with contextlib.suppress(OSError):
            (ckpt.folder / "model.safetensors.tmp").unlink(missing_ok=True)
        what = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        latest = ckpt.latest()
        if latest is not None and latest.name == name:
            problem = (
                f"checkpoint {name} is saved, but {ckpt.folder / 'model.safetensors'} "
                f"could not be updated ({what})."
            )
        else:
            problem = f"could not write checkpoint {name} in {ckpt.dir} ({what})."
        raise SystemExit(
            f"error: {problem} {_intact(ckpt)} Make room (or fix the folder) and continue with: "
            f"python train.py --resume {ckpt.folder}"
        ) from None


# A sharded checkpoint (torch.distributed.checkpoint) unpickles its .metadata with plain pickle
# and its non-tensor entries (the optimizer's hyper-parameters) with weights_only=False: either
# could run code. The metadata is first read with an unpickler that admits only DCP's own
# record types, and the entries are read with weights_only=True.
_DCP_RECORD_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == _DCP_RECORD_MODULE:
            import torch.distributed.checkpoint.metadata as records

            record = getattr(records, name, None)
            if isinstance(record, type):  # its dataclasses and enums; no functions
                return record
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


def check_sharded_metadata(folder: Path) -> None:
    """Refuse a sharded checkpoint whose metadata holds anything but DCP's own records."""
    for path in sorted(folder.glob(".metadata*")):
        try:
            with open(path, "rb") as f:
                _DCPMetadataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise SystemExit(
                f"error: refused to load {path}: it holds more than checkpoint metadata ({err}); "
                "checkpoints never run code when opened"
            ) from None
        except Exception as err:  # a truncated or garbled file
            raise SystemExit(f"error: cannot read {path}: {err}") from None


def safe_load_planner():
    """DCP's default load planner, reading non-tensor entries with weights_only=True."""
    import io

    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            plain = torch.load(value, weights_only=True)  # refuses anything but plain data
            again = io.BytesIO()
            torch.save(plain, again)
            again.seek(0)
            super().load_bytes(read_item, again)

    return SafeLoadPlanner()


@contextlib.contextmanager
def _sharded_load_errors(folder: Path):
    """DCP wraps every failure in a multi-line CheckpointException: say what went wrong."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as err:
        causes = [exc for exc, _ in err.failures.values()]
        if any(isinstance(exc, pickle.UnpicklingError) for exc in causes):
            raise SystemExit(
                f"error: refused to load {folder}: an entry holds more than tensors and plain "
                "data; checkpoints never run code when opened"
            ) from None
        first = str(causes[0]).splitlines()[0] if causes else str(err).splitlines()[0]
        raise SystemExit(f"error: cannot load the sharded checkpoint {folder}: {first}") from None


def check_resumed_model(saved: MiniTuringConfig, built: MiniTuringConfig, folder: Path) -> None:
    """A resumed run must build the model its folder holds: options that change it (or a
    config.json edited by hand) are refused, naming each difference."""
    fields = (
        "preset", "vocab_size", "tokenizer_size", "hidden_size", "num_layers", "num_heads",
        "ffn_size", "max_position_embeddings",
    )  # fmt: skip
    differences = [
        f"{name} is {getattr(saved, name, None)!r} there, these options give "
        f"{getattr(built, name, None)!r}"
        for name in fields
        if getattr(saved, name, None) != getattr(built, name, None)
    ]
    if differences:
        raise SystemExit(
            f"error: --resume {folder}: the model in {folder / 'config.json'} is not the one "
            f"these options build: {'; '.join(differences)}. A resumed run keeps its model: "
            "drop the options that change it."
        )


def _stop_requested(stop: StopSignal, env: Env) -> bool:
    """Whether to stop for a signal now. Every process must stop at the same step while a
    signal may reach them at different moments, so with several they agree on it."""
    if not env.distributed:
        return stop.received is not None
    signum = torch.tensor([stop.received or 0], device=env.device)
    torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
    if int(signum) and stop.received is None:
        stop.received = int(signum)
    return bool(int(signum))


# ---------------------------------------------------------------------------- the loop


class StopSignal:
    """SIGTERM / SIGINT (pre-emption, Ctrl-C): finish the step, checkpoint, exit with status
    128 + the signal's number, what a shell reports for a process the signal ended, so that
    schedulers and scripts see the run as not finished. A second signal stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.honoured = False  # the loop stopped for it (rather than ending anyway)
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


@contextlib.contextmanager
def _local_main_first(env: Env):
    """The body runs first in each machine's local rank 0 (which fills the on-disk caches),
    then in the machine's other processes (which find them filled)."""
    if env.distributed and env.local_rank != 0:
        torch.distributed.barrier()
    yield
    if env.distributed and env.local_rank == 0:
        torch.distributed.barrier()


def _from_rank0(env: Env, make):
    """``make()`` run on rank 0 alone, its result sent to every other rank."""
    if not env.distributed:
        return make()
    box = [make() if env.main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _agreed(value: float, env: Env) -> float:
    """Rank 0's value on every rank: decisions taken from a process's own clock (how many
    steps fit a time budget, whether it is spent) must be the same everywhere, or the ranks
    stop at different steps and wait for each other forever."""
    if not env.distributed:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=env.device)
    torch.distributed.broadcast(box, src=0)
    return float(box)


def _check_global_batch(state: dict, global_batch: int, env: Env) -> None:
    """The learning rate and schedule are per optimizer step of the global batch; a run resumed
    on another number of processes continues the same recipe only with the same global batch."""
    saved = state.get("global_batch", global_batch)
    if saved != global_batch and env.main:
        print(
            f"warning: the checkpoint was trained with a global batch of {saved} sequences, this "
            f"run's is {global_batch}; to continue the same recipe on {env.world_size} "
            "process(es), choose --batch-size and --grad-accum so that batch x accumulation x "
            f"processes = {saved}",
            flush=True,
        )
    state["global_batch"] = global_batch


def _reduce_losses(
    sums: dict[str, list[torch.Tensor]], label_counts: list[int], batches, env: Env
) -> dict[str, list]:
    """Per objective, the step's mean loss over the label tokens of the whole global batch
    (all micro-batches, all ranks), so what rank 0 logs is what one process with the global
    batch would log. ``sums`` holds loss x label tokens per micro-batch, in float64 so a lone
    micro-batch gives back its own mean exactly."""
    names = list(sums)
    counts = dict.fromkeys(names, 0)
    for (name, _), count in zip(batches, label_counts, strict=True):
        counts[name] += count
    totals = torch.stack(
        [torch.stack(sums[n]).sum() for n in names]
        + [torch.tensor(float(counts[n]), dtype=torch.float64, device=env.device) for n in names]
    )
    totals = _all_reduce_sum(totals, env).cpu()
    k = len(names)
    return {n: [float(totals[i] / totals[k + i].clamp(min=1))] for i, n in enumerate(names)}


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
    return model_config(
        tokenizer,
        **shape,
        max_position_embeddings=opts.max_positions,
        dropout=opts.dropout,
        preset=opts.preset,
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
        (o.max_bad_steps >= 1, f"--max-bad-steps must be >= 1, got {o.max_bad_steps}"),
        (o.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {o.warmup_steps}"),
        (0 <= o.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {o.min_lr_ratio}"),
        (o.weight_decay >= 0, f"--weight-decay must be >= 0, got {o.weight_decay}"),
        (o.clip_grad >= 0, f"--clip-grad must be >= 0 (0: off), got {o.clip_grad}"),
        (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)"),
        (math.isfinite(o.lr), f"--lr must be a finite number, got {o.lr}"),
        (0 <= m.dropout < 1, f"--dropout must be in [0, 1), got {m.dropout}"),
        (0 <= d.eval_fraction < 1, f"--eval-fraction must be in [0, 1), got {d.eval_fraction}"),
    ]
    for flag in ("hidden_size", "num_layers", "num_heads", "ffn_size"):
        value = getattr(m, flag)
        checks.append(
            (value is None or value >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {value}")
        )
    return checks


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
    checks += _range_checks(cfg)
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")
    return seq_len


def train(cfg: TrainConfig) -> Path:
    """Run training as configured; returns the run folder."""
    with contextlib.ExitStack() as held:  # the run folder's lock, for the whole run
        return _train(cfg, held)


def _train(cfg: TrainConfig, held: contextlib.ExitStack) -> Path:
    seq_len = validate(cfg)
    check_report_to(cfg.run.report_to)
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
    held.enter_context(hold_run_folder(out, main=env.main, distributed=env.distributed))
    if env.main:
        if not resuming and (out / "checkpoints" / "latest").exists():
            raise SystemExit(
                f"error: {out} already holds a run; continue it with --resume {out} "
                "or choose another --output-dir"
            )
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)

    # Data and tokenizer. With several processes, each machine's first one builds the corpus and
    # tokenization caches while the others wait and then read them, and the tokenizer is
    # trained once, by rank 0, and sent to the others.
    t0 = time.perf_counter()
    with _local_main_first(env):
        raw = load_raw(cfg.data)
    if resuming:
        tokenizer = load_tokenizer(out)
    elif cfg.data.tokenizer:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    else:
        tokenizer = _from_rank0(
            env,
            lambda: train_tokenizer(
                raw.train_texts + [d for d, _ in raw.train_pairs],
                kind=cfg.data.tokenizer_kind,
                vocab_size=cfg.data.vocab_size,
            ),
        )
    available = [n for n in OBJECTIVES if raw.has(n)]
    weights = parse_objectives(cfg.run.objectives, available)
    objectives = [n for n, w in weights.items() if w > 0]
    model_config = build_model_config(cfg, tokenizer)
    with _local_main_first(env):
        streams = build_streams(
            raw, tokenizer, cfg.data, objectives, seq_len, model_config.vocab_size
        )
    if cfg.run.objectives.strip() == "auto":
        # "Every objective with data": one whose examples all fell away (no document with two
        # sentences for gap_summary, say) is left out rather than failing the run.
        for name in [n for n in objectives if len(streams.train[n]) == 0]:
            if env.main:
                log.warning("objective %s has no training examples; left out of the mixture", name)
            weights.pop(name)
            objectives.remove(name)
            streams.train.pop(name)
            streams.eval.pop(name, None)
        if not objectives:
            raise ValueError("no objective has training examples in the given data")
    data_seconds = time.perf_counter() - t0

    model = MiniTuringModel(model_config)
    if resuming:
        saved = MiniTuringConfig.from_pretrained(out)
        check_compatible(tokenizer, saved, where=str(out))
        check_resumed_model(saved, model_config, out)
    wrapped = wrap_model(
        model,
        env,
        activation_checkpointing=cfg.run.activation_checkpointing,
        compile=cfg.run.compile,
    )
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
                f"error: --resume {out}: no complete checkpoint in {out / 'checkpoints'} (the "
                "run stopped before its first save); start it again without --resume"
            )
        state = ckpt.load(latest, model, optimizer)
        loader.load_state_dict(state["data"])
    if env.main and not resuming:
        model_config.training = cfg.to_dict()
        model_config.save_pretrained(out)
        save_tokenizer(tokenizer, out)
        save_remote_code(out)  # AutoModel*.from_pretrained(out, trust_remote_code=True)
    metrics = Metrics(
        out / "metrics.jsonl",
        env.main,
        state["step"] if resuming else None,
        report_to=cfg.run.report_to,
    )

    global_batch = cfg.optim.batch_size * cfg.optim.grad_accum * env.world_size
    if env.main:
        n_params = sum(p.numel() for p in model.parameters())
        precision = "bf16 autocast" if env.dtype else "fp32"
        print(
            f"model: {cfg.model.preset}, {n_params / 1e6:.1f}M parameters | device {env.device} x{env.world_size}"
            f"{'' if env.strategy == 'none' else ' ' + env.strategy.upper()}, "
            f"{precision}\ndata: {raw.description} (prepared in {data_seconds:.0f}s)\n"
            f"objectives: {', '.join(f'{n}={w:g}' for n, w in weights.items())} | "
            f"{streams.describe()}\n"
            f"global batch {global_batch} sequences = {cfg.optim.batch_size} x {cfg.optim.grad_accum} "
            f"accumulation x {env.world_size} processes; block {seq_len} tokens"
            + (f"\nresuming from step {state['step']}" if resuming else ""),
            flush=True,
        )
    _check_global_batch(state, global_batch, env)

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
    if stop.honoured:
        # Pre-empted: the grace period is short, so no plot or samples, and an exit status
        # that says the run did not finish.
        if env.main:
            print(reason, flush=True)
            metrics.close()
        raise SystemExit(128 + stop.received)
    if env.main:
        print(reason, flush=True)
        metrics.close()
        write_training_curves(out)
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
    # The losses of a logging window a checkpoint cut in two come back with it.
    window = {"tokens": 0, "time": 0.0, "data": 0.0, "losses": state.pop("window_losses", {})}
    clock = time.perf_counter()
    elapsed_before = state["elapsed"]
    reason = "done"
    # The time estimate waits until the speed is known, sooner on a short run.
    eta_at = start_step + min(ETA_AFTER_STEPS, max((total - start_step) // 2, 1))

    def checkpoint() -> None:
        state["data"] = loader.state_dict()
        state["window_losses"] = window["losses"]
        state["elapsed"] = elapsed_before + time.perf_counter() - clock
        # Every rank: a sharded model saves collectively.
        save_checkpoint(ckpt, model, optimizer, state, env)
        if env.distributed:
            torch.distributed.barrier()

    while state["step"] < total:
        step = state["step"]
        t_step = time.perf_counter()
        batches = [loader.next_batch() for _ in range(optim.grad_accum)]
        t_data = time.perf_counter() - t_step
        # Normalise by the label tokens of the whole global batch, so N processes x b equal
        # one process x N*b and accumulation equals a bigger batch exactly.
        label_counts = [int((b["labels"] != IGNORE_INDEX).sum()) for _, b in batches]
        counts = torch.tensor(float(sum(label_counts)))
        global_count = _all_reduce_sum(counts.to(env.device), env).clamp(min=1)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, optim)
        loss_sums: dict[str, list[torch.Tensor]] = {}
        for i, (name, batch) in enumerate(batches):
            batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
            sync = i == len(batches) - 1 or not env.distributed
            ctx = contextlib.nullcontext() if sync else no_sync(wrapped)
            with ctx:
                with autocast(env):
                    out = wrapped(**batch)
                loss = out.loss * out.num_label_tokens / global_count * env.world_size
                loss.backward()
            loss_sums.setdefault(name, []).append(out.loss.detach().double() * out.num_label_tokens)
            window["tokens"] += int(batch["input_ids"].numel()) * env.world_size
        step_losses = _reduce_losses(loss_sums, label_counts, batches, env)
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
                tqdm.write(f"step {step + 1}: non-finite loss or gradient, step skipped")
            if state["bad_steps"] >= optim.max_bad_steps:
                bar.close()
                raise SystemExit(
                    f"error: stopped at step {step + 1}: {state['bad_steps']} consecutive steps "
                    f"with a non-finite loss or gradient. {_intact(ckpt)} Try a lower --lr (or "
                    "--clip-grad), or look for broken data."
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
            per_step = _agreed((now - clock) / max(state["step"] - start_step, 1), env)
            total = max(state["step"], min(run.max_steps, int(run.time_budget / per_step)))
            state["planned_steps"] = total
            bar.total = total
            bar.refresh()
        if env.main and state["step"] == eta_at and state["step"] < total:
            tqdm.write(eta_line(state["step"] - start_step, now - clock, state["step"], total))

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
                "skipped_steps": state.get("skipped_steps", 0),
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
        if _stop_requested(stop, env):
            checkpoint()
            bar.close()
            stop.honoured = True
            return (
                f"stopped by signal {stop.received} at step {state['step']}; checkpoint saved. "
                f"Continue with: python train.py --resume {cfg.run.output_dir}"
            )
        if run.save_every and state["step"] % run.save_every == 0 and not last:
            checkpoint()
        if run.time_budget and not last and _agreed(elapsed >= run.time_budget, env):
            total = state["step"]
            reason = f"time budget of {run.time_budget:g}s reached at step {total}"
    bar.close()
    if state["step"] > start_step:
        # (A resumed run with nothing left to train already has this evaluation, logged just
        # before this checkpoint; saving it again would replace the latest complete checkpoint
        # in place.)
        _evaluate(cfg, env, model, streams, tokenizer, metrics, state)
        checkpoint()
    skipped = state.get("skipped_steps", 0)
    if skipped:
        reason += (
            f" ({skipped} step{'s' if skipped > 1 else ''} skipped: non-finite loss or gradient)"
        )
    return f"{reason}: {state['step']} steps, {state['tokens']:,} tokens; run folder {cfg.run.output_dir}"


def _evaluate(cfg, env, model, streams, tokenizer, metrics, state) -> dict:
    """Held-out metrics, logged by rank 0. Every rank calls this: with several processes (or
    FSDP) the work is shared out, see ``_evaluate_shared``."""
    if env.distributed or _is_fsdp(model):
        results = _evaluate_shared(cfg, env, model, streams, tokenizer)
    else:
        with autocast(env):
            results = evaluate(
                model,
                tokenizer,
                streams.eval,
                batch_size=cfg.optim.batch_size,
                max_batches=cfg.run.eval_batches,
                rouge_samples=cfg.run.rouge_samples,
            )
    if env.main:
        record = {"step": state["step"], **{f"eval/{k}": v for k, v in results.items()}}
        metrics.write(record)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items())
        tqdm.write(f"eval @ step {state['step']}: {shown}")
    return results


# ---------------------------------------------------------------------------- shared evaluation


@torch.no_grad()
def _evaluate_shared(cfg, env, model, streams, tokenizer) -> dict[str, float]:
    """``model.evaluate.evaluate``'s numbers, computed by all ranks together: rank r takes the
    held-out batches r, r + N, ... (the same batches and masks one process would use), and
    token-weighted sums are all-reduced. Under FSDP each forward gathers weights collectively,
    so every rank runs the same number of them: a rank short of batches repeats its first one
    and ignores the result."""
    fsdp, bs = _is_fsdp(model), cfg.optim.batch_size
    names = [n for n, s in streams.eval.items() if len(s)]
    sums = torch.zeros(len(names), 3, dtype=torch.float64)  # loss x tokens, tokens, correct
    was_training = model.training
    model.eval()
    try:
        for j, name in enumerate(names):
            stream = streams.eval[name]
            n = len(stream)
            # --eval-batches counts global batches (micro-batch x ranks), as one process
            # with the global batch size would evaluate them.
            num_batches = min(cfg.run.eval_batches * env.world_size, math.ceil(n / bs))
            mine: list[int | None] = list(range(env.rank, num_batches, env.world_size))
            if fsdp:
                mine += [None] * (math.ceil(num_batches / env.world_size) - len(mine))
            for b in mine:
                start = (b or 0) * bs
                indices = np.arange(start, min(start + bs, n))
                arrays = stream.batch(indices, indices, EVAL_SEED)
                batch = {k: torch.from_numpy(v).to(env.device) for k, v in arrays.items()}
                with autocast(env):
                    out = model(**batch)
                if b is None:
                    continue
                labels = batch["labels"]
                correct = (out.logits.argmax(-1) == labels[labels != IGNORE_INDEX]).sum()
                count = int(out.num_label_tokens)
                sums[j] += torch.tensor([float(out.loss) * count, count, int(correct)])
    finally:
        model.train(was_training)
    sums = _all_reduce_sum(sums.to(env.device), env).cpu()
    results: dict[str, float] = {}
    for j, name in enumerate(names):
        loss_sum, tokens, correct = sums[j].tolist()
        if tokens == 0:
            continue
        loss = loss_sum / tokens
        accuracy = "accuracy" if name == "masked_lm" else "token_accuracy"
        results[f"{name}/loss"] = loss
        results[f"{name}/perplexity"] = math.exp(min(loss, 50))
        results[f"{name}/{accuracy}"] = correct / tokens
    results.update(_rouge_shared(cfg, env, model, streams, tokenizer))
    return results


def _rouge_shared(cfg, env, model, streams, tokenizer) -> dict[str, float]:
    """ROUGE of greedy summaries of the first held-out documents.

    DDP: each rank summarizes every N-th document with its own replica; per-document scores
    are summed across ranks. FSDP: decoding runs a data-dependent number of forward passes,
    which sharded weights cannot follow rank by rank, so the full weights are gathered onto
    rank 0's CPU and rank 0 decodes alone (only rank 0 logs the result).
    """
    stream = streams.eval.get("summarize")
    count = min(cfg.run.rouge_samples, len(stream)) if stream is not None else 0
    if count == 0:
        return {}
    fsdp = _is_fsdp(model)
    if fsdp:
        weights = full_state_dict(model)  # collective
        if not env.main:
            return {}
        with torch.device("meta"):
            replica = MiniTuringModel(model.config)
        replica.load_state_dict(weights, assign=True)
        model, mine = replica.to(env.device), list(range(count))
    else:
        mine = list(range(env.rank, count, env.world_size))
    shard = Seq2SeqStream(
        "summarize",
        [stream.sources[i] for i in mine],
        [stream.targets[i] for i in mine],
        stream.ids,
        source_len=stream.source_len,
        target_len=stream.target_len,
    )
    scores: dict[str, float] = {}
    if mine:
        with autocast(env):
            scores = evaluate(
                model,
                tokenizer,
                {"summarize": shard},
                batch_size=cfg.optim.batch_size,
                max_batches=0,
                rouge_samples=len(mine),
            )
    # Every score is a mean over documents: weight each rank's by its number of documents.
    parts = [(scores, len(mine))]
    if env.distributed and not fsdp:
        parts = [None] * env.world_size
        torch.distributed.all_gather_object(parts, (scores, len(mine)))
    total = sum(n for _, n in parts)
    keys = dict.fromkeys(k for s, _ in parts for k in s)
    return {k: sum(s.get(k, 0.0) * n for s, n in parts) / total for k in keys}


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
    except (ValueError, OSError, RunFolderLocked) as err:
        # Data and configuration errors carry their own explanation (file, record, expectation).
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:
        # A second Ctrl-C: stop at once, without a traceback; completed checkpoints are whole.
        print(f"interrupted; continue from the last complete checkpoint with: python train.py "
              f"--resume {cfg.run.output_dir}", file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(128 + signal.SIGINT) from None
    samples = folder / "samples.json"
    if int(os.environ.get("RANK", "0")) == 0 and samples.is_file():
        print_samples(json.loads(samples.read_text()))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
