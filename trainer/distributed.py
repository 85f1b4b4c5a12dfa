"""Where the program runs: devices, precision, the process group, and the one place where the
plain model becomes the trained one (activation checkpointing, compile, DDP or FSDP2); plus the
few collectives the trainer needs, each a no-op for a single process."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model.transformer import MiniTuringModel
from trainer.errors import TrainingError

if TYPE_CHECKING:
    from trainer.config import RunConfig


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
    local = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun's; the global rank: rank()
    want = run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(
                f"--device {run.device} asks for CUDA, but no CUDA device is available"
            )
        _check_cuda_placement(run.device, want, local)
        device = torch.device(want if ":" in want else f"cuda:{local}")
        torch.cuda.set_device(device)
    elif want == "cpu":
        device = torch.device("cpu")
    else:
        raise TrainingError(f"--device must be auto, cpu, cuda or cuda:N, got {run.device!r}")
    strategy = _resolve_strategy(run.strategy, world)
    if run.compile:
        _check_compiler(device)
    _init_process_group(device, world, strategy)
    if run.precision not in ("auto", "fp32", "bf16"):
        raise TrainingError(f"--precision must be auto, fp32 or bf16, got {run.precision!r}")
    if run.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("--precision bf16: this GPU does not support bfloat16")
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
    return Env(device, torch.bfloat16 if bf16 else None, rank(), world, local, strategy)


def _check_cuda_placement(flag: str, want: str, local_rank: int) -> None:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if ":" in want and local_world > 1:
        raise TrainingError(
            f"--device {flag} puts all {local_world} processes of this machine on one "
            "GPU; use --device cuda (process i takes cuda:LOCAL_RANK)"
        )
    if ":" not in want and local_rank >= torch.cuda.device_count():
        raise TrainingError(
            f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but only "
            f"{torch.cuda.device_count()} are visible; lower --nproc_per_node"
        )


def _resolve_strategy(flag: str, world: int) -> str:
    """auto: DDP when several processes, nothing with one. FSDP on one process is allowed (the
    sharded code path and its bf16 policy on a single GPU); DDP of one replica is the plain model."""
    if flag not in ("auto", "ddp", "fsdp"):
        raise TrainingError(f"--strategy must be auto, ddp or fsdp, got {flag!r}")
    if flag == "fsdp":
        if not torch.distributed.is_available():
            raise TrainingError("--strategy fsdp: this PyTorch build has no torch.distributed")
        return "fsdp"
    return "ddp" if world > 1 else "none"


def _check_compiler(device: torch.device) -> None:
    """torch.compile's code generator needs Triton for GPUs and a C++ compiler for CPUs."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise TrainingError("--compile on GPU needs Triton (pip install triton)")
        return
    compilers = [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
    if not any(c and shutil.which(c) for c in compilers):
        raise TrainingError(
            "--compile on CPU needs a C++ compiler (g++ or clang++, or set CXX); "
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


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_sync(wrapped: torch.nn.Module):
    """Context for a non-final micro-step: gradients accumulate locally and the all-reduce
    (DDP) or reduce-scatter (FSDP) waits for the last micro-step of the optimizer step."""
    if is_fsdp(wrapped):
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


# ---------------------------------------------------------------------------- collectives


def rank() -> int:
    """This process's rank: 0 without a process group."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain, full weights on CPU (the safetensors export). Under FSDP this gathers the shards
    onto rank 0's CPU one tensor at a time and is a collective: every rank must call it; the
    other ranks get an empty dict."""
    if not is_fsdp(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def all_reduce_sum(value: torch.Tensor, env: Env) -> torch.Tensor:
    if env.distributed:
        torch.distributed.all_reduce(value)
    return value


@contextlib.contextmanager
def local_main_first(env: Env):
    """The body runs first in each machine's local rank 0 (which fills the on-disk caches),
    then in the machine's other processes (which find them filled)."""
    if env.distributed and env.local_rank != 0:
        torch.distributed.barrier()
    yield
    if env.distributed and env.local_rank == 0:
        torch.distributed.barrier()


def from_rank0(env: Env, make):
    """``make()`` run on rank 0 alone, its result sent to every other rank."""
    if not env.distributed:
        return make()
    box = [make() if env.main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def rank0_value(value: float, env: Env) -> float:
    """Rank 0's value on every rank: decisions taken from a process's own clock (how many
    steps fit a time budget, whether it is spent) must be the same everywhere, or the ranks
    stop at different steps and wait for each other forever."""
    if not env.distributed:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=env.device)
    torch.distributed.broadcast(box, src=0)
    return float(box)
