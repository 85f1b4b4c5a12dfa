"""What ``bench/compare.py`` runs in a process of its own, each with its own peak memory:

python -m bench.sides {ceiling,mlm_hf,seq2seq_hf,count_ours} SPEC.json RESULT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.common import grouped_by_length, hf_model, hf_trainer
from model.constants import IGNORE_INDEX
from trainer.metrics import peak_memory_mb


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def counted_flops(step) -> float:
    """FLOPs torch's FlopCounterMode counts in ``step()`` (a forward and backward). Attention
    in its plain form (matmuls), which the counter can count on every device."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def ceiling(spec: dict) -> dict:
    """FLOP/s of each matrix product in ``spec["ceiling"]`` (square, and the model's own
    shapes) in the run's precision: the best of a few timed trials each (noise only ever
    slows a trial down)."""
    device = spec["device"]
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    rates = {}
    for name, (batch, m, k, n) in spec["ceiling"].items():
        a = torch.randn(batch, m, k, device=device, dtype=dtype)
        b = torch.randn(batch, k, n, device=device, dtype=dtype)

        def trial(a=a, b=b, flops=2 * batch * m * k * n, seconds=0.1) -> float:
            """Products for ``seconds`` (bounded in time, however slow a busy machine is)."""
            reps, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                torch.bmm(a, b)
                sync(device)
                reps += 1
            return flops * reps / elapsed

        trial(seconds=0.02)  # warm-up
        rates[name] = max(trial() for _ in range(3))
    best = max(rates, key=rates.get)
    return {"flops_per_s": rates[best], "shape": best, "shapes": rates, "dtype": str(dtype)[6:]}


def train_hf(spec: dict, model, data, collator, count) -> dict:
    """Train with HF's Trainer; time from the end of the warm-up steps to the end of the last
    step; ``count(batch)`` gives a batch's (tokens, positions). Then count one step's FLOPs."""
    from transformers import TrainerCallback

    warmup, total = spec["warmup"], spec["warmup"] + spec["steps"]
    marks, counts = {}, []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, total):
                sync(spec["device"])
                marks[state.global_step] = time.perf_counter()

    def note(module, args, kwargs):
        counts.append(count(kwargs))

    def note_autocast(module, args):
        autocast.setdefault("seen", torch.is_autocast_enabled(torch.device(spec["device"]).type))

    autocast = {}
    model.register_forward_pre_hook(note, with_kwargs=True)
    # On a layer inside: accelerate enters autocast within the forward, after the model's hooks.
    next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).register_forward_pre_hook(
        note_autocast
    )
    # Matched to train.py's: precision, peak learning rate, warm-up and cosine decay to 10%, AdamW
    # betas/eps/decay, fused AdamW, clipping; no logging.
    shown = dict(
        max_steps=total, per_device_train_batch_size=spec["batch_size"], learning_rate=spec["lr"],
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=spec["lr_warmup"], weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98,
        adam_epsilon=1e-6, max_grad_norm=1.0, optim="adamw_torch_fused",
        bf16=spec["precision"] == "bf16", use_cpu=spec["device"] == "cpu",
        dataloader_num_workers=0, logging_strategy="no", seed=spec["seed"],
        **spec.get("hf_extra", {}),
    )  # fmt: skip
    trainer = hf_trainer(model, data, collator, spec["out"], [Timer()], **shown)
    trainer.train()
    if sorted(marks) != [warmup, total] or len(counts) != total:
        raise RuntimeError(f"expected steps {warmup} and {total}, saw {sorted(marks)}")
    memory = peak_memory_mb()
    tokens = sum(int(t) for t, _ in counts[warmup:])
    positions = sum(int(p) for _, p in counts[warmup:])
    batch = {k: v.to(model.device) for k, v in next(iter(trainer.get_train_dataloader())).items()}
    counts.clear()
    flops = counted_flops(lambda: model(**batch).loss.backward())
    return {
        "seconds": marks[total] - marks[warmup],
        "tokens": tokens,
        "padding_share": 1 - tokens / positions,
        "counted_flops_per_token": flops / int(counts[0][0]),
        "peak_mem_mib": memory,
        "params": sum(p.numel() for p in model.parameters()),
        "autocast": autocast.get("seen"),
        "settings": {k: v for k, v in shown.items() if not isinstance(v, dict)},
    }


def hf_side(spec: dict, kind: str) -> dict:
    """HF's BERT ("bert": packed blocks, every position a token) or BART ("bart": our framed
    pairs, length-grouped) at the benchmark's shape, without dropout as ours trains by default,
    trained on the data compare.py prepared."""
    from datasets import load_from_disk
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

    from model.tokenizer import load_tokenizer

    tokenizer, ids = load_tokenizer(spec["tokenizer"]), spec["ids"]
    ids = {"vocab": spec["shape"]["vocab_size"], "pad": ids["pad"], "bos": ids["cls"], "eos": ids["sep"]}  # fmt: skip
    model = hf_model(kind, spec["shape"], ids, spec["seed"], layers=spec["bart_layers"])
    if kind == "bert":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=spec["mask_rate"])
        count = lambda kw: (kw["input_ids"].numel(),) * 2  # noqa: E731
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX)
        count, spec["hf_extra"] = seq2seq_tokens, grouped_by_length()
    return train_hf(spec, model, load_from_disk(spec["dataset"]), collator, count)


def seq2seq_tokens(kw: dict) -> tuple:
    """A BART batch's tokens as ours counts its own, [CLS] source [SEP] target (the closing
    [SEP] is a label, not an input, in ours), and its input positions, padding included."""
    labels = kw["labels"] != IGNORE_INDEX
    tokens = kw["attention_mask"].sum() + labels.sum() - len(labels)
    return tokens, kw["input_ids"].numel() + labels.numel()


def count_ours(spec: dict) -> dict:
    """FLOPs of one training step of the run in ``spec["run"]``: its model, on the first batch
    its data loader gives (the public data API, from the run's own config), per real token."""
    from data.batching import MixtureLoader
    from data.pipeline import build_streams
    from data.raw import load_raw
    from model.tokenizer import load_tokenizer
    from model.transformer import MiniTuringModel
    from trainer.config import TrainConfig

    model = MiniTuringModel.from_pretrained(spec["run"]).to(spec["device"]).train()
    cfg = TrainConfig.from_dict(model.config.training)
    name = spec["objective"]
    tokenizer = load_tokenizer(spec["run"])
    streams = build_streams(load_raw(cfg.data), tokenizer, cfg.data, [name], model.config.seq_len)
    loader = MixtureLoader(streams.train, {name: 1.0}, cfg.optim.batch_size, cfg.run.seed)
    batch = {k: v.to(spec["device"]) for k, v in loader.next_batch()[1].items()}
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    flops = counted_flops(lambda: model(**batch).loss.backward())
    return {"counted_flops_per_token": flops / tokens, "params": model.num_parameters()}


TASKS = {"ceiling": ceiling, "count_ours": count_ours, "mlm_hf": lambda spec: hf_side(spec, "bert"),
         "seq2seq_hf": lambda spec: hf_side(spec, "bart")}  # fmt: skip


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in TASKS:
        raise SystemExit(f"usage: python -m bench.sides {{{','.join(TASKS)}}} SPEC RESULT")
    task, spec_file, result_file = argv
    spec = json.loads(Path(spec_file).read_text())
    Path(result_file).write_text(json.dumps(TASKS[task](spec), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
