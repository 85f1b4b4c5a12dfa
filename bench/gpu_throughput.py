"""Training throughput and model-FLOPs utilization (MFU) of one short ``train.py`` run.

    python bench/gpu_throughput.py                         # base preset, bf16, sequence 512, masked LM
    python bench/gpu_throughput.py --compile               # the same with compiled blocks
    torchrun --nproc_per_node 8 bench/gpu_throughput.py --strategy fsdp --run-dir /tmp/tp
    python bench/gpu_throughput.py --tiny --device cpu     # a seconds-long smoke run of this script

The run is ``train.train`` itself (data loader, masking, optimizer and all), so the number is
what training gets. Tokens/s is measured between the first and the last metrics.jsonl line:
the first log window, which holds start-up and warm-up, is left out. MFU is
``MiniTuringConfig.flops_per_token(seq_len)`` (forward + backward, output layer counted at every
position) x tokens/s, over the peak dense bf16 FLOP/s of the GPUs used: a table of known
GPUs, else a measured large bf16 matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import train  # noqa: E402
from model.config import PRESETS, MiniTuringConfig  # noqa: E402

# Dense (not 2:4 sparse) bf16 tensor-core peaks from the vendor's data sheets, per GPU. The
# first name contained in torch.cuda.get_device_name() wins, so the specific come first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16_FLOPS:
            if key in name and dtype == torch.bfloat16:
                return flops, f"data sheet ({key})"
    return measured_matmul_flops(device, dtype), "measured matmul"


def measured_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: a stand-in peak for devices not in the table."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    iters, start = 20, time.perf_counter()
    for _ in range(iters):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


def train_flags(args: argparse.Namespace, run_dir: Path) -> list[str]:
    if args.tiny:
        shape = ["--preset", "tiny", "--hidden-size", "64", "--num-layers", "2"]
        shape += ["--num-heads", "2", "--ffn-size", "128", "--seq-len", "64"]
        shape += ["--vocab-size", "2000", "--corpus-max-chars", "400000"]
    else:
        shape = ["--preset", args.preset, "--seq-len", str(args.seq_len)]
        # A learning rate for a model of this size: the tiny preset's default could diverge,
        # and skipped non-finite steps would stop the run before it is measured.
        shape += ["--corpus-max-chars", str(args.corpus_chars), "--lr", "3e-4"]
    flags = shape + [
        *("--objectives", "masked_lm=1", "--device", args.device, "--precision", args.precision),
        *("--batch-size", str(args.batch_size), "--max-steps", str(args.steps)),
        *("--log-every", str(args.log_every), "--warmup-steps", "10", "--eval-every", "0"),
        *("--eval-batches", "1", "--rouge-samples", "0", "--save-every", "0", "--no-progress"),
        *("--strategy", args.strategy, "--output-dir", str(run_dir)),
    ]
    if args.compile:
        flags.append("--compile")
    if args.activation_checkpointing:
        flags.append("--activation-checkpointing")
    return flags


def measure(run_dir: Path, device: torch.device, dtype: torch.dtype, world: int) -> dict:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if "tokens_per_s" in m]
    if len(logged) < 2:
        raise SystemExit(
            f"error: {run_dir / 'metrics.jsonl'} has {len(logged)} log lines; "
            "need at least 2 (raise --steps or lower --log-every)"
        )
    first, last = logged[0], logged[-1]
    tokens_per_s = (last["tokens"] - first["tokens"]) / (last["elapsed"] - first["elapsed"])
    config = MiniTuringConfig.from_pretrained(run_dir)
    options = config.training["model"]
    seq_len = options["seq_len"] or PRESETS[options["preset"]]()["seq_len"]
    flops_per_token = config.flops_per_token(seq_len)
    peak, source = peak_flops(device, dtype)
    steps = last["step"] - first["step"]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processes": world,
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "parameters_m": round(config.num_parameters() / 1e6, 1),
        "seq_len": seq_len,
        "global_batch": config.training["optim"]["batch_size"] * world,
        "steps_measured": steps,
        "step_ms": 1000 * (last["elapsed"] - first["elapsed"]) / steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "peak_flops_per_device": peak,
        "peak_source": source,
        "mfu": flops_per_token * tokens_per_s / (peak * world),
        "data_wait": sum(m["data_wait"] for m in logged[1:]) / len(logged[1:]),
        "max_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--precision", default=None, help="bf16 (default on cuda) or fp32")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch per process")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--corpus-chars", type=int, default=3_000_000)
    parser.add_argument("--strategy", default="auto", help="auto, ddp or fsdp")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--run-dir", help="run folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--label", default="throughput", help="name of this row in the table")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"error: --device {args.device}, but torch {torch.__version__} sees no CUDA device"
        )
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.tiny:
        args.batch_size, args.steps, args.log_every = min(args.batch_size, 8), 12, 4
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.run_dir is None and world > 1:
        raise SystemExit("error: with several processes, name a shared --run-dir")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="throughput-")) / "run"

    folder = train.train(train.config_from_args(train_flags(args, run_dir))).folder
    if int(os.environ.get("RANK", "0")) == 0:
        cuda = args.device.startswith("cuda")
        # train.py has moved this process to its GPU (cuda:LOCAL_RANK, or the one named).
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        result = {"label": args.label, **measure(folder, device, dtype, world)}
        print(
            f"{args.label}: {result['tokens_per_s']:,.0f} tokens/s, MFU {100 * result['mfu']:.1f}%\n"
            f"  on {result['device']} x{world}, {result['precision']}; peak "
            f"{result['peak_flops_per_device'] / 1e12:.4g} TFLOP/s per device "
            f"({result['peak_source']})",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
