"""Training throughput and model-FLOPs utilization (MFU) of one short ``train.py`` run, and the
closing table of ``bench/gpu_check.sh``.

    python -m bench.gpu_throughput                      # base preset, bf16, sequence 512, masked LM
    torchrun --nproc_per_node 8 -m bench.gpu_throughput --strategy fsdp --run-dir /tmp/tp
    python -m bench.gpu_throughput --tiny --device cpu  # a seconds-long smoke run of this script
    python -m bench.gpu_throughput --report OUT_DIR     # the table of OUT_DIR/parts.tsv, *.json

MFU: summary.json's model FLOP/s over the GPUs' data-sheet dense bf16 peak (else a matmul's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Dense (not 2:4 sparse) bf16 tensor-core peaks from the vendor's data sheets, per GPU. The
# first name contained in torch.cuda.get_device_name() wins, so the specific come first.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                   ("H200", 989e12), ("A100", 312e12))  # fmt: skip


def peak_flops(device, precision: str) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number comes from: the table, else the FLOP/s of
    a large square matmul."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    for key, flops in PEAK_BF16_FLOPS if precision == "bf16" else ():
        if key in name:
            return flops, f"data sheet ({key})"
    n, iters = (8192 if device.type == "cuda" else 512), 20
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for warm in (True, False):
        start = time.perf_counter()
        for _ in range(3 if warm else iters):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start), "measured matmul"


def train_flags(args: argparse.Namespace, run_dir: Path) -> list[str]:
    if args.tiny:
        shape = "--preset tiny --hidden-size 64 --num-layers 2 --num-heads 2 --ffn-size 128 "
        shape += "--seq-len 64 --vocab-size 2000 --corpus-max-chars 400000"
    else:  # a learning rate for this size: the tiny preset's could diverge and skip steps
        shape = f"--preset {args.preset} --seq-len {args.seq_len} "
        shape += f"--corpus-max-chars {args.corpus_chars} --lr 3e-4"
    flags = shape.split() + [
        *("--objectives", "masked_lm=1", "--device", args.device, "--precision", args.precision),
        *("--batch-size", str(args.batch_size), "--max-steps", str(args.steps)),
        *("--log-every", str(args.log_every), "--warmup-steps", "10", "--eval-every", "0"),
        *("--eval-batches", "1", "--rouge-samples", "0", "--save-every", "0", "--no-progress"),
        *("--strategy", args.strategy, "--output-dir", str(run_dir)),
    ]
    return flags + ["--compile"] * args.compile + ["--activation-checkpointing"] * args.activation_checkpointing  # fmt: skip


def measure(run_dir: Path, device, precision: str, log_every: int) -> dict:
    """The row of one run, from its summary.json and config.json."""
    import torch

    from model.config import MiniTuringConfig

    s = json.loads((run_dir / "summary.json").read_text())
    if not s["tokens_per_s"]:
        raise SystemExit(f"error: {run_dir} logged one window only; raise --steps or lower --log-every")  # fmt: skip
    config, world = MiniTuringConfig.from_pretrained(run_dir), s["processes"]
    peak, source = peak_flops(device, precision)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processes": world, "precision": s["precision"],
        "parameters_m": round(config.num_parameters() / 1e6, 1), "seq_len": config.length("seq_len"),
        "global_batch": config.training["optim"]["batch_size"] * world,
        "step_ms": 1000 * s["timed_seconds"] / (s["steps"] - log_every),
        "tokens_per_s": s["tokens_per_s"], "flops_per_token": s["flops_per_token"],
        "peak_flops_per_device": peak, "peak_source": source,
        "mfu": s["model_flops_per_s"] / (peak * world), "data_wait": s["data_wait"],
        "max_memory_gib": s["peak_memory_mb"] / 1024 if device.type == "cuda" else None,
    }  # fmt: skip


def report(folder: Path) -> str:
    """Each part's status and time (``parts.tsv``), then one row per throughput result."""
    from bench.common import table

    tsv = folder / "parts.tsv"
    parts = [("part", "status", "seconds", "detail")] + [
        tuple((line.split("\t") + [""] * 4)[:4]) for line in (tsv.read_text().splitlines() if tsv.is_file() else [])
    ]  # fmt: skip
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not results:
        return "\n".join(["", table(parts), "", "no throughput result"])
    rows = [("run", "device", "procs", "params", "seq", "batch", "tokens/s", "MFU", "step ms", "data wait", "max mem")]  # fmt: skip
    for r in results:
        memory = r.get("max_memory_gib")
        rows.append((r.get("label", "?"), f"{r['device']} {r['precision']}", str(r["processes"]),
                     f"{r['parameters_m']}M", str(r["seq_len"]), str(r["global_batch"]),
                     f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%", f"{r['step_ms']:.1f}",
                     f"{100 * r['data_wait']:.0f}%", "-" if memory is None else f"{memory:.1f} GiB"))  # fmt: skip
    peaks = {(r["device"], r["peak_flops_per_device"], r["peak_source"]) for r in results}
    notes = [f"peak {p / 1e12:.4g} TFLOP/s per {d} ({s})" for d, p, s in sorted(peaks)]
    return "\n".join(["", table(parts), "", table(rows), *notes])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--device", default="cuda", help="cuda or cpu")
    add("--precision", default=None, help="bf16 (default on cuda) or fp32")
    add("--preset", default="base")
    add("--seq-len", type=int, default=512)
    add("--batch-size", type=int, default=32, help="micro-batch per process")
    add("--steps", type=int, default=200)
    add("--log-every", type=int, default=25)
    add("--corpus-chars", type=int, default=3_000_000)
    add("--strategy", default="auto", help="auto, ddp or fsdp")
    add("--compile", action="store_true")
    add("--activation-checkpointing", action="store_true")
    add("--tiny", action="store_true", help="tiny sizes, for a smoke run")
    add("--run-dir", help="run folder (default: a temporary one)")
    add("--json", help="also write the result here")
    add("--label", default="throughput", help="name of this row in the table")
    add("--report", metavar="OUT_DIR", help="print the table of bench/gpu_check.sh's folder")
    args = p.parse_args(argv)
    if args.report:
        print(report(Path(args.report)))
        return
    import torch

    import train

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}, but torch {torch.__version__} sees no CUDA device")  # fmt: skip
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.tiny:
        args.batch_size, args.steps, args.log_every = min(args.batch_size, 8), 12, 4
    if args.run_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("error: with several processes, name a shared --run-dir")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="throughput-")) / "run"
    folder = train.train(train.config_from_args(train_flags(args, run_dir))).folder
    if int(os.environ.get("RANK", "0")) == 0:
        # train.py has moved this process to its GPU (cuda:LOCAL_RANK, or the one named).
        cuda = args.device.startswith("cuda")
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        r = {"label": args.label, **measure(folder, device, args.precision, args.log_every)}
        print(f"{args.label}: {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%\n"
              f"  on {r['device']} x{r['processes']}, {r['precision']}; peak "
              f"{r['peak_flops_per_device'] / 1e12:.4g} TFLOP/s per device ({r['peak_source']})",
              flush=True)  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
