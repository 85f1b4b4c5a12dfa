"""minituring against Hugging Face, side by side, on this machine, in one run.

    python -m bench.compare                                   # every part, tiny shape
    python -m bench.compare --parts mlm --steps 40 --json bench.json
    python -m bench.compare --device cuda --preset base       # GPU: BERT-base shape, sequence 512

Parts ``mlm`` (BertForMaskedLM + Trainer) and ``seq2seq`` (BART + Trainer); ours is ``train.py``,
the HF side ``bench/hf.py``, each on the same data; docs/performance.md explains the columns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

from bench.common import Failed, run, run_train, table
from model.config import SHAPE_FIELDS, resolve_shape

PARTS = ("mlm", "seq2seq")
# Our side's architecture flags: the trainer's defaults, or the HF models' own (BERT and BART
# have learned positions, LayerNorm and GELU), the same computation on both sides.
ARCHITECTURES = {
    "default": [],
    "bert": ["--position", "learned", "--norm", "layernorm", "--ffn", "gelu"],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add = p.add_argument
    add("--parts", default="mlm,seq2seq", help=f"comma list of {PARTS}")
    add("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    add("--preset", default="tiny", choices=("tiny", "base"), help="base needs a GPU")
    add("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="as train.py's")
    add("--steps", type=int, default=None, help="timed masked-LM steps (CPU 20, GPU 50)")
    add("--warmup", type=int, default=None, help="untimed masked-LM steps (CPU 5, GPU 10)")
    add("--seq2seq-steps", type=int, default=None, help="timed steps (CPU 12, GPU 50)")
    add("--seq2seq-warmup", type=int, default=None, help="untimed steps (CPU 3, GPU 10)")
    add("--train-rounds", type=int, default=2, help="training runs a side, HF, ours, ours, HF")
    add("--batch-size", type=int, default=32)
    add("--lr", type=float, default=2e-3, help="peak learning rate, both sides")
    add("--seed", type=int, default=0)
    for name in SHAPE_FIELDS:
        add("--" + name.replace("_", "-"), type=int, default=None, help="default: the preset's")
    add("--max-positions", type=int, default=512)
    add(
        "--architecture",
        default="default",
        choices=tuple(ARCHITECTURES),
        help="ours: the trainer's default architecture, or the HF side's (bert: learned "
        "positions, LayerNorm, GELU), so the ratio measures the trainer alone",
    )
    add("--vocab-size", type=int, default=8192, help="tokenizer entries")
    add("--bart-layers", default=None, help="ENC,DEC (default: half our layers each)")
    add("--source-len", type=int, default=256)
    add("--target-len", type=int, default=32)
    add("--train-text", nargs="+", default=[], help="as train.py's (default: embedded corpus)")
    add("--train-pairs", nargs="+", default=[], help="as train.py's")
    add("--corpus-max-chars", type=int, default=None)
    add("--timeout", type=float, default=900, help="seconds per process")
    add("--json", default=None, metavar="PATH", help="write all results here")
    add("--keep", action="store_true", help="keep the temporary folder")
    return p


def resolve(args: argparse.Namespace) -> dict:
    """Flags -> checked settings: parts, device, precision, shape, steps."""
    import torch

    from trainer.config import RunConfig
    from trainer.distributed import setup_env

    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not parts or set(parts) - set(PARTS):
        raise SystemExit(f"error: --parts: unknown {parts}; choose from {', '.join(PARTS)}")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    gpu = device.startswith("cuda")
    if args.preset == "base" and not gpu:
        raise SystemExit("error: --preset base is the GPU benchmark; run it with --device cuda")
    shape = resolve_shape(args.preset, **{k: getattr(args, k) for k in SHAPE_FIELDS})
    shape["max_positions"] = args.max_positions

    def given(value, cpu, cuda):
        return value if value is not None else (cuda if gpu else cpu)

    steps = {"mlm": (given(args.warmup, 5, 10), given(args.steps, 20, 50)),
             "seq2seq": (given(args.seq2seq_warmup, 3, 10), given(args.seq2seq_steps, 12, 50))}  # fmt: skip
    bart = [max(1, shape["num_layers"] // 2)] * 2
    if args.bart_layers:
        bart = [int(x) for x in args.bart_layers.split(",") if x.isdigit()]
    checks = [
        (all(min(s) >= 1 for s in steps.values()), "steps and warm-ups must be >= 1"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (shape["seq_len"] <= args.max_positions, "--seq-len exceeds --max-positions"),
        (args.source_len + args.target_len <= args.max_positions,
         "--source-len + --target-len exceeds --max-positions"),
        (len(bart) == 2 and min(bart) >= 1, "--bart-layers wants ENC,DEC (>= 1 each)"),
        (args.train_rounds >= 1, "--train-rounds must be >= 1"),
    ]  # fmt: skip
    if failed := [message for ok, message in checks if not ok]:
        raise SystemExit(f"error: {failed[0]}")
    try:  # train.py's own decision (bf16 on GPUs, and on CPUs where it measures faster)
        env = setup_env(RunConfig(device=device, precision=args.precision))
    except Exception as err:
        raise SystemExit(f"error: {err}") from None
    precision = "bf16" if env.dtype else "fp32"
    return {"parts": parts, "device": device, "gpu": gpu, "precision": precision,
            "shape": shape, "steps": steps, "bart_layers": bart}  # fmt: skip


def prepare(args: argparse.Namespace, settings: dict, tmp: Path) -> dict:
    """One tokenizer for both sides, and the HF side's data, from the same files through the
    public functions of our data package: masked-LM blocks (``pack_blocks``/``block``) and
    framed pairs (``build_example``)."""
    from datasets import Dataset

    from data.config import DataConfig
    from data.objectives.masked_lm import block, pack_blocks
    from data.objectives.summarize import build_example
    from data.pipeline import build_streams
    from data.raw import load_raw
    from data.vocab import save_tokenizer, train_tokenizer
    from model.config import round_vocab
    from model.tokenizer import load_tokenizer, special_ids

    parts, shape = settings["parts"], settings["shape"]
    lengths = dict(source_len=args.source_len, target_len=args.target_len)
    cfg = DataConfig(train_text=list(args.train_text), train_pairs=list(args.train_pairs),
                     corpus_max_chars=args.corpus_max_chars, **lengths)  # fmt: skip
    raw = load_raw(cfg)
    objectives = [o for p, o in (("mlm", "masked_lm"), ("seq2seq", "summarize")) if p in parts]
    for name in objectives:
        if not raw.has(name):
            raise SystemExit(f"error: the data has no {'pairs' if name == 'summarize' else 'text'}")
    texts = raw.train_texts + [d for d, _ in raw.train_pairs]
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
    save_tokenizer(tokenizer, tmp / "tokenizer")
    tokenizer = load_tokenizer(tmp / "tokenizer")
    ids = special_ids(tokenizer)
    shape["vocab_size"] = round_vocab(len(tokenizer))
    streams = build_streams(raw, tokenizer, cfg, sorted(set(objectives)), shape["seq_len"])
    spec = {
        "device": settings["device"], "precision": settings["precision"], "seed": args.seed,
        "shape": shape, "bart_layers": settings["bart_layers"],
        "ids": {"pad": ids.pad, "cls": ids.cls, "sep": ids.sep}, "data": raw.description,
        "tokenizer": str(tmp / "tokenizer"), "lr": args.lr, "batch_size": args.batch_size,
        **lengths,
    }  # fmt: skip
    if "mlm" in parts:
        flat, n = streams.train["masked_lm"].flat, shape["seq_len"]
        blocks = [block(flat, i, n, ids.cls) for i in range(pack_blocks(flat, n))]
        Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(tmp / "mlm-data"))
    if "seq2seq" in parts:
        s = streams.train["summarize"]
        examples = [build_example(a, b, cls_id=ids.cls, sep_id=ids.sep, **lengths)
                    for a, b in zip(s.sources, s.targets, strict=True)]  # fmt: skip
        pairs = {"input_ids": [x[:p] for x, _, p in examples],
                 "labels": [y[p - 1 :] for _, y, p in examples]}  # fmt: skip
        Dataset.from_dict(pairs).save_to_disk(str(tmp / "seq2seq-data"))
    return spec


def side(task: str, spec: dict, tmp: Path, timeout: float) -> dict:
    name = f"{task}-{len(list(tmp.glob(task + '-*.json')))}"
    spec_file, result = tmp / f"{name}.json", tmp / f"{name}.result"
    spec_file.write_text(json.dumps(spec))
    try:
        run([sys.executable, "-m", "bench.hf", task, str(spec_file), str(result)],
            tmp / f"{name}.log", timeout=timeout)  # fmt: skip
    except Failed as err:
        return {"error": err.why}
    return json.loads(result.read_text())


def ours_flags(args: argparse.Namespace, spec: dict, part: str) -> list[str]:
    """The train.py command line of our side of ``part``."""
    warmup, steps = spec["warmup"], spec["steps"]
    shape = [f"--{k.replace('_', '-')}={v}" for k, v in spec["shape"].items() if k != "vocab_size"]
    flags = [
        *shape, "--source-len", args.source_len,
        "--target-len", args.target_len, "--batch-size", args.batch_size, "--lr", args.lr,
        "--warmup-steps", spec["lr_warmup"], "--max-steps", warmup + steps,
        "--log-every", warmup,  # the first log window is the warm-up; the timed steps follow
        "--eval-every", 0, "--save-every", 0, "--eval-batches", 1, "--rouge-samples", 0,
        "--no-progress", "--device", spec["device"], "--precision", spec["precision"],
        "--seed", args.seed, "--tokenizer", spec["tokenizer"], "--mask-rate", spec["mask_rate"],
        "--objectives", "masked_lm=1" if part == "mlm" else "summarize=1",
        *ARCHITECTURES[args.architecture],
    ]  # fmt: skip
    flags += ["--corpus-max-chars", args.corpus_max_chars] * (args.corpus_max_chars is not None)
    if data := (args.train_text if part == "mlm" else args.train_pairs):
        flags += ["--train-text" if part == "mlm" else "--train-pairs", *data]
    return [str(x) for x in flags]


def ours(args: argparse.Namespace, spec: dict, part: str, tmp: Path) -> dict:
    """``python train.py`` in a fresh folder; the timed window of its summary.json."""
    from model.config import MiniTuringConfig

    out = tmp / f"ours-{part}-{len(list(tmp.glob(f'ours-{part}-*.log')))}"
    try:
        s = run_train(ours_flags(args, spec, part), out, timeout=args.timeout)
    except Failed as err:
        return {"error": err.why}
    return {
        "seconds": s["timed_seconds"],
        "tokens": s["timed_tokens"] if part == "mlm" else s["timed_real_tokens"],
        "padding_share": s["padding_share"], "data_wait": s["data_wait"],
        "peak_mem_mib": s["peak_memory_mb"], "precision": s["precision"], "run": str(out),
        "command": s["command"], "params": MiniTuringConfig.from_pretrained(out).num_parameters(),
    }  # fmt: skip


def pool(first: dict | None, second: dict) -> dict:
    """A task's runs joined: training tokens and seconds summed (each run's speed in ``runs``),
    data wait and padding weighted by seconds and tokens; the higher peak memory. A failed run
    stands for all."""
    if first is None or "error" in first or "error" in second:
        return second if first is None or "error" in second else first
    merged = {**first, "peak_mem_mib": max(first["peak_mem_mib"], second["peak_mem_mib"])}
    runs = first.get("runs", [first["tokens"] / first["seconds"]])
    merged["runs"] = runs + [second["tokens"] / second["seconds"]]
    for key, weight in (("data_wait", "seconds"), ("padding_share", "tokens")):
        if first.get(key) is not None and second.get(key) is not None:
            total = first[weight] + second[weight]
            merged[key] = (first[key] * first[weight] + second[key] * second[weight]) / total
    for key in ("seconds", "tokens"):
        merged[key] = first[key] + second[key]
    return merged


def abba(part: str, rounds: int) -> list[str]:
    """HF, ours, then ours, HF, ...: drift over the part falls on both sides alike."""
    pairs = [[f"{part}_hf", f"{part}_ours"], [f"{part}_ours", f"{part}_hf"]]
    return [task for i in range(rounds) for task in pairs[i % 2]]


def tasks_for(parts: list[str], train_rounds: int = 1) -> list[str]:
    return [task for part in PARTS if part in parts for task in abba(part, train_rounds)]


def run_all(args: argparse.Namespace, settings: dict, spec: dict, tmp: Path) -> dict:
    results = {}
    for task in tasks_for(settings["parts"], args.train_rounds):
        part, _, who = task.partition("_")
        print(f"  {task}", flush=True)
        warmup, steps = settings["steps"][part]
        specs = {**spec, "warmup": warmup, "steps": steps, "lr_warmup": max((warmup + steps) // 10, 1),
                 "mask_rate": 0.15, "out": str(tmp / f"hf-{part}"), "dataset": str(tmp / f"{part}-data")}  # fmt: skip
        if who == "ours":
            result = ours(args, specs, part, tmp)
        else:
            result = side(task, specs, tmp, args.timeout)
        results[task] = pool(results.get(task), result)
    return results


def ok(result: dict | None) -> bool:
    return bool(result) and "error" not in result  # ran, and did not fail


def build_rows(spec: dict, results: dict, architecture: str = "default") -> list[dict]:
    """One row per measurement; every ratio computed here from the measured numbers."""
    rows: list[dict] = []
    enc, dec = spec["bart_layers"]
    same = " (HF's architecture)" if architecture != "default" else ""
    names = {"mlm": ("HF BertForMaskedLM + Trainer", f"ours train.py masked_lm{same}"),
             "seq2seq": (f"HF BART {enc}+{dec} layers + Trainer", f"ours train.py summarize{same}")}  # fmt: skip
    keep = ("peak_mem_mib", "data_wait", "padding_share", "runs", "params")
    for part, (hf_name, ours_name) in names.items():
        sides = {"HF": results.get(f"{part}_hf"), "ours": results.get(f"{part}_ours")}
        if sides == {"HF": None, "ours": None}:
            continue
        speed = {k: r["tokens"] / r["seconds"] if ok(r) else None for k, r in sides.items()}
        for (key, r), name in zip(sides.items(), (hf_name, ours_name), strict=True):
            row = {"part": part, "contestant": name, "value": speed[key], "unit": "tokens/s"}
            row.update({k: r[k] for k in keep if ok(r) and r.get(k) is not None})
            if not ok(r):
                row["error"] = (r or {}).get("error", "not run")
            elif key == "ours":
                row["ratio"] = speed["ours"] / speed["HF"] if speed["HF"] else None
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("part", "contestant", "speed", "ours vs HF", "peak mem", "data wait", "note")
    lines = []
    for r in rows:
        note = [f"{r['params'] / 1e6:.2f}M params"] if r.get("params") else []
        if r.get("padding_share") is not None and r["part"] == "seq2seq":
            note.append(f"{100 * r['padding_share']:.0f}% padding")
        if r.get("runs"):
            note.append("runs " + " / ".join(f"{x:,.0f}" for x in r["runs"]))
        v, mem, wait, ratio = r["value"], r.get("peak_mem_mib"), r.get("data_wait"), r.get("ratio")
        speed = ("FAILED" if r.get("error") else "-") if v is None else f"{v:,.0f} tok/s"
        lines.append((r["part"], r["contestant"], speed, f"{ratio:.2f}x" if ratio else "",
                      f"{mem:,.0f} MiB" if mem else "", f"{100 * wait:.1f}%" if wait is not None else "",
                      ", ".join(note)))  # fmt: skip
    return table([header, *lines], rule=True)


def describe(args: argparse.Namespace, settings: dict, spec: dict, results: dict) -> str:
    """What was compared, above the table (docs/performance.md explains the columns)."""
    s, (mw, ms), (sw, ss) = spec["shape"], settings["steps"]["mlm"], settings["steps"]["seq2seq"]
    lines = [
        f"device {settings['device']}, precision {settings['precision']}; {s['num_layers']} layers x "
        f"{s['hidden_size']}, {s['num_heads']} heads, FFN {s['ffn_size']}, vocabulary {s['vocab_size']}, "
        f"batch {args.batch_size}; data: {spec['data']}; our architecture: {args.architecture} "
        f"{' '.join(ARCHITECTURES[args.architecture]) or '(the trainer defaults)'}",
        f"{args.train_rounds} runs a side (HF, ours, ours, HF), tokens/s over the steps after the "
        f"warm-up; mlm: sequence {s['seq_len']}, {mw} + {ms} steps; seq2seq: source "
        f"{args.source_len}, target {args.target_len}, {sw} + {ss} steps",
    ]  # fmt: skip
    for task in ("mlm_hf", "seq2seq_hf"):
        if ok(results.get(task)):
            t = results[task]["settings"]
            shown = ", ".join(f"{k}={t[k]}" for k in ("optim", "learning_rate", "bf16", "warmup_steps") if k in t)  # fmt: skip
            lines.append(f"{task}: sdpa attention; {shown}; autocast seen: {results[task]['autocast']}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = resolve(args)
    tmp = Path(tempfile.mkdtemp(prefix="minituring-bench-"))
    try:
        print(f"preparing data and tokenizer in {tmp} ...", flush=True)
        try:
            spec = prepare(args, settings, tmp)
        except (ValueError, OSError) as err:
            raise SystemExit(f"error: {err}") from None
        results = run_all(args, settings, spec, tmp)
        rows = build_rows(spec, results, args.architecture)
        if args.json:
            report = {
                "command": ["python", "-m", "bench.compare", *(sys.argv[1:] if argv is None else argv)],
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "settings": settings, "results": results, "rows": rows,
            }  # fmt: skip
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"\n{describe(args, settings, spec, results)}\n\n{format_table(rows)}")
        if failed := [t for t, r in results.items() if not ok(r)]:
            print(f"\nfailed: {', '.join(failed)} (logs in {tmp})", file=sys.stderr)
            args.keep = True
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
