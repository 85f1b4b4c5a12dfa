"""The contestants of ``bench/compare.py``, one per process.

    python bench/_workers.py TASK SPEC.json RESULT.json

``compare.py`` writes SPEC (shapes, steps, device, precision, paths of the data it prepared),
starts one process per TASK and reads back RESULT. A process of its own gives each contestant
its own heap and allocator, so its peak memory (peak resident set, VmHWM, on CPU;
``torch.cuda.max_memory_allocated`` on GPU) is its own, and nothing one leaves behind slows
the next.

Tasks: ceiling, mlm_hf, mlm_ours, seq2seq_hf, seq2seq_ours, generate_hf, generate_ours,
quality_hf, quality_ours.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------- shared helpers


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device: str) -> dict:
    """This process's peak: resident set on CPU, allocated tensor memory on GPU."""
    if device.startswith("cuda"):
        return {
            "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20,
            "mem_kind": "torch.cuda.max_memory_allocated",
        }
    # VmHWM is the peak of this process image alone. ru_maxrss is not: Linux carries it over
    # exec from the forking parent, so every contestant would report at least the parent's
    # resident set (which holds the whole prepared corpus).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_mem_mib": int(line.split()[1]) / 1024, "mem_kind": "peak RSS (VmHWM)"}
    except OSError:
        pass
    return {  # elsewhere ru_maxrss, in KiB on Linux and bytes on macOS
        "peak_mem_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / (2**20 if sys.platform == "darwin" else 1024),
        "mem_kind": "ru_maxrss",
    }


def our_flags(spec: dict, part: dict, out: Path) -> list[str]:
    """train.py flags shared by both of our training contestants."""
    shape = spec["shape"]
    flags = [
        "--preset", spec["preset"],
        "--hidden-size", str(shape["hidden_size"]),
        "--num-layers", str(shape["num_layers"]),
        "--num-heads", str(shape["num_heads"]),
        "--ffn-size", str(shape["ffn_size"]),
        "--max-positions", str(shape["max_positions"]),
        "--source-len", str(spec["source_len"]),
        "--target-len", str(spec["target_len"]),
        "--batch-size", str(part["batch_size"]),
        "--lr", str(spec["lr"]),
        "--warmup-steps", str(part["lr_warmup"]),
        "--max-steps", str(part["warmup"] + part["steps"]),
        # The first log window is exactly the warm-up; the timed steps follow it.
        "--log-every", str(part["warmup"]),
        "--eval-every", "0",
        "--save-every", "0",
        "--eval-batches", "1",
        "--rouge-samples", "0",
        "--no-progress",
        "--device", spec["device"],
        "--precision", spec["precision"],
        "--seed", str(spec["seed"]),
        "--tokenizer", spec["tokenizer"],
        "--output-dir", str(out),
    ]  # fmt: skip
    return flags + spec["data_flags"]


def fresh_folder(spec: dict, name: str) -> Path:
    """The run folder of a training task, emptied: a part runs each side more than once, and
    train.py would resume the earlier run found there instead of training."""
    out = Path(spec["tmp"]) / name
    shutil.rmtree(out, ignore_errors=True)
    return out


def train_ours(spec: dict, flags: list[str]) -> dict:
    """Run train.py in this process; returns the peak memory taken when training is over.

    train.train ends with a training-curves plot and sample predictions (matplotlib and a
    second copy of the model), which are not training. Where the trainer still has that step,
    the peak is read right before it, else at the end of the process.
    """
    import train
    from trainer import loop

    at_end: dict = {}
    original = getattr(loop, "write_training_curves", None)
    if original is not None:

        def curves_after_peak(*args, **kwargs):
            at_end.update(peak_memory(spec["device"]))
            return original(*args, **kwargs)

        loop.write_training_curves = curves_after_peak
    try:
        train.train(train.config_from_args(flags))
    finally:
        if original is not None:
            loop.write_training_curves = original
    if at_end:
        at_end["mem_kind"] += ", up to the end of training"
    return at_end


def read_timed_window(metrics_file: Path, warmup: int, total: int) -> dict:
    """Wall-clock seconds and tokens between the end of step ``warmup`` and the end of step
    ``total``, from train.py's metrics.jsonl, and the data wait over those steps.

    ``elapsed`` is the trainer's wall clock at the end of a logged step, so the difference
    covers everything the loop did in between (data, forward, backward, optimizer, logging),
    like the HF callback's on_step_end to on_step_end. ``tokens`` counts input positions,
    padding included.
    """
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    logs = {r["step"]: r for r in records if "tokens_per_s" in r}
    if warmup not in logs or total not in logs:
        raise RuntimeError(
            f"{metrics_file}: expected training records at steps {warmup} and {total}, "
            f"found steps {sorted(logs)}"
        )
    seconds = logs[total]["elapsed"] - logs[warmup]["elapsed"]
    # Each record's window: tokens since the previous record, at its tokens_per_s.
    steps = sorted(s for s in logs if warmup < s <= total)
    window_time = data_time = 0.0
    previous = logs[warmup]
    for s in steps:
        r = logs[s]
        t = (r["tokens"] - previous["tokens"]) / max(r["tokens_per_s"], 1e-9)
        window_time += t
        data_time += r["data_wait"] * t
        previous = r
    return {
        "seconds": seconds,
        "padded_tokens": logs[total]["tokens"] - logs[warmup]["tokens"],
        "tokens_at_warmup": logs[warmup]["tokens"],
        "data_wait": data_time / max(window_time, 1e-9),
    }


def training_arguments(spec: dict, part: dict, out: Path, **extra):
    """The HF Trainer's settings, matched to ours: same precision, peak learning rate, warm-up
    length and cosine decay to 10%, AdamW betas/eps/decay, fused AdamW, gradient clipping;
    data loading in the main process; no evaluation, saving or logging."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(out),
        max_steps=part["warmup"] + part["steps"],
        per_device_train_batch_size=part["batch_size"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=part["lr_warmup"],
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_epsilon=1e-6,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=spec["precision"] == "bf16",
        use_cpu=spec["device"] == "cpu",
        dataloader_num_workers=0,
        dataloader_pin_memory=spec["device"] != "cpu",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec["seed"],
        **extra,
    )
    return TrainingArguments(**kwargs), {k: v for k, v in kwargs.items() if k != "output_dir"}


def step_timer(device: str, warmup: int, total: int):
    """A TrainerCallback that notes the wall clock at the end of steps ``warmup`` and ``total``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, total):
                _sync(device)
                self.marks[state.global_step] = time.perf_counter()

        def seconds(self) -> float:
            if warmup not in self.marks or total not in self.marks:
                raise RuntimeError(
                    f"the Trainer ended at other steps than expected: saw {sorted(self.marks)}, "
                    f"expected {warmup} and {total}"
                )
            return self.marks[total] - self.marks[warmup]

    return StepTimer()


def watch_autocast(model: torch.nn.Module, device: str) -> dict:
    """Notes whether the Trainer's forward passes really ran under bf16 autocast."""
    seen: dict = {}
    kind = torch.device(device).type

    def note(module, args, kwargs):
        if "autocast" not in seen:
            on = torch.is_autocast_enabled(kind)
            seen["autocast"] = (
                str(torch.get_autocast_dtype(kind)).replace("torch.", "") if on else "off"
            )

    # On a layer inside the model: accelerate enters autocast inside the wrapped forward,
    # after the model's own pre-hooks have run.
    first_linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_pre_hook(note, with_kwargs=True)
    return seen


def counted_flops_per_token(step, tokens: int) -> float:
    """FLOPs of one training forward and backward, ``step()``, as torch's FlopCounterMode counts
    its matrix products and attention, per token: what the model really computes (ours skips
    work no loss reads), where a formula would count what the architecture implies."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # Attention in its plain form (matmuls, softmax): the counter has no formula for every
    # fused kernel (not for the CPU's), and would leave attention out.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step().backward()
    return counter.get_total_flops() / tokens


def _full_length_pairs(spec: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the summarization shape with no padding: (batch, source_len) sources and
    (batch, target_len) targets, random ids past the special tokens (ours frames them with
    build_example, which keeps those lengths)."""
    part, vocab = spec["seq2seq"], spec["shape"]["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    shape = (part["batch_size"],)
    return (
        torch.randint(8, vocab, (*shape, part["source_len"]), generator=gen),
        torch.randint(8, vocab, (*shape, part["target_len"]), generator=gen),
    )


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are listed once


def _special(tokenizer):
    from data.tokenizer import special_ids

    return special_ids(tokenizer)


def _hf_model_config_common(spec: dict, ids) -> dict:
    return dict(vocab_size=spec["shape"]["vocab_size"], pad_token_id=ids.pad)


# ---------------------------------------------------------------------------- the ceiling


def ceiling(spec: dict) -> dict:
    """FLOP/s of a square matrix product in the benchmark's precision: the best of several
    timed trials (noise only ever slows a trial down)."""
    c = spec["ceiling"]
    n, device = c["size"], spec["device"]
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def run(k: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(k):
            torch.mm(a, b, out=out)
        _sync(device)
        return time.perf_counter() - start

    run(2)
    reps = max(1, math.ceil(c["trial_seconds"] / max(run(1), 1e-6)))
    rates = [2 * n**3 * reps / run(reps) for _ in range(c["trials"])]
    return {
        "flops_per_s": max(rates),
        "median_flops_per_s": statistics.median(rates),
        "size": n,
        "dtype": str(dtype).replace("torch.", ""),
        "products_per_trial": reps,
        "trials": rates,
    }


# ---------------------------------------------------------------------------- masked LM


def mlm_ours(spec: dict) -> dict:
    part = spec["mlm"]
    out = fresh_folder(spec, "ours-mlm")
    flags = our_flags(spec, part, out) + [
        "--objectives", "masked_lm=1",
        "--seq-len", str(part["seq_len"]),
        "--mask-rate", str(part["mask_rate"]),
    ]  # fmt: skip
    memory = train_ours(spec, flags)
    warmup, total = part["warmup"], part["warmup"] + part["steps"]
    window = read_timed_window(out / "metrics.jsonl", warmup, total)
    from model.config import MiniTuringConfig

    config = MiniTuringConfig.from_pretrained(out)
    return {
        **window,
        "tokens": window["padded_tokens"],  # packed blocks: no padding
        "tokens_per_s": window["padded_tokens"] / window["seconds"],
        "params": config.num_parameters(),
        "flags": flags,
        **memory,
    }


def _bert_mlm(spec: dict, tokenizer):
    """HF BertForMaskedLM at the benchmark's shape, seeded as ours is."""
    from transformers import BertConfig, BertForMaskedLM

    shape, ids = spec["shape"], _special(tokenizer)
    torch.manual_seed(spec["seed"])
    config = BertConfig(
        **_hf_model_config_common(spec, ids),
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        intermediate_size=shape["ffn_size"],
        max_position_embeddings=shape["max_positions"],
        # Ours trains without dropout by default; the same here, so both do the same work.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM._from_config(config, attn_implementation="sdpa")


def mlm_hf(spec: dict) -> dict:
    from datasets import load_from_disk
    from transformers import DataCollatorForLanguageModeling, Trainer

    from data.tokenizer import load_tokenizer

    part = spec["mlm"]
    tokenizer = load_tokenizer(spec["tokenizer"])
    model = _bert_mlm(spec, tokenizer)
    data = load_from_disk(part["dataset"])
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm=True, mlm_probability=part["mask_rate"]
    )
    autocast = watch_autocast(model, spec["device"])
    out = fresh_folder(spec, "hf-mlm")
    args, shown = training_arguments(spec, part, out)
    warmup, total = part["warmup"], part["warmup"] + part["steps"]
    timer = step_timer(spec["device"], warmup, total)
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[timer]
    )
    trainer.train()
    seconds = timer.seconds()
    tokens = part["steps"] * part["batch_size"] * part["seq_len"]
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "params": _n_params(model),
        "hf_config": {
            "model": "BertForMaskedLM",
            "attn_implementation": model.config._attn_implementation,
            "autocast_seen": autocast.get("autocast"),
            "collator": f"DataCollatorForLanguageModeling(mlm_probability={part['mask_rate']})",
            "training_arguments": shown,
        },
    }


# ---------------------------------------------------------------------------- equal time


def _quality_part(spec: dict, side: str) -> dict:
    """The quality run as a masked-LM part: the side's step count, warm-up a tenth of it."""
    q = spec["quality"]
    steps = q["steps"][side]
    log_every = max(1, steps // 10)
    return {
        "warmup": log_every,  # our_flags logs every ``warmup`` steps
        "steps": steps - log_every,
        "lr_warmup": log_every,
        "batch_size": q["batch_size"],
    }


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, spec: dict) -> float:
    """Mean cross-entropy over every masked token of the held-out blocks, fp32, eval mode."""
    from datasets import load_from_disk

    data = load_from_disk(spec["quality"]["dataset"]).with_format("torch")
    model.eval()
    total = count = 0.0
    for start in range(0, len(data), 32):
        batch = data[start : start + 32]
        labels = batch["labels"].to(spec["device"])
        n = int((labels != IGNORE_INDEX).sum())
        loss = model(input_ids=batch["input_ids"].to(spec["device"]), labels=labels).loss
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def quality_ours(spec: dict) -> dict:
    from model.transformer import MiniTuringModel

    part = _quality_part(spec, "ours")
    out = Path(spec["tmp"]) / "ours-quality"
    flags = our_flags(spec, part, out) + [
        "--objectives", "masked_lm=1",
        "--seq-len", str(spec["quality"]["seq_len"]),
        "--mask-rate", str(spec["mlm"]["mask_rate"]),
    ]  # fmt: skip
    train_ours(spec, flags)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    last = [r for r in records if "tokens_per_s" in r][-1]
    model = MiniTuringModel.from_pretrained(out).to(spec["device"])
    return {
        "steps": last["step"],
        "train_seconds": last["elapsed"],
        "train_tokens": last["tokens"],
        "heldout_loss": heldout_loss(model, spec),
        "flags": flags,
    }


def quality_hf(spec: dict) -> dict:
    from datasets import load_from_disk
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback

    from data.tokenizer import load_tokenizer

    part = _quality_part(spec, "hf")
    tokenizer = load_tokenizer(spec["tokenizer"])
    model = _bert_mlm(spec, tokenizer)
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm=True, mlm_probability=spec["mlm"]["mask_rate"]
    )
    args, _ = training_arguments(spec, part, Path(spec["tmp"]) / "hf-quality")
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks["begin"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            _sync(spec["device"])
            marks["end"] = time.perf_counter()

    data = load_from_disk(spec["mlm"]["dataset"])
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Clock()]
    )
    trainer.train()
    steps = trainer.state.global_step
    return {
        "steps": steps,
        "train_seconds": marks["end"] - marks["begin"],
        "train_tokens": steps * part["batch_size"] * spec["quality"]["seq_len"],
        "heldout_loss": heldout_loss(model, spec),
    }


# ---------------------------------------------------------------------------- summarization


def seq2seq_ours(spec: dict) -> dict:
    part = spec["seq2seq"]
    out = fresh_folder(spec, "ours-seq2seq")
    flags = our_flags(spec, part, out) + ["--objectives", "summarize=1"]
    memory = train_ours(spec, flags)
    warmup, total = part["warmup"], part["warmup"] + part["steps"]
    window = read_timed_window(out / "metrics.jsonl", warmup, total)
    # The parent replayed our data loader (a pure function of seed and position) to count the
    # real tokens of each step; the trainer's own padded counts prove the replay matched.
    replay = part["ours_replay"]
    expected = (
        sum(replay["padded"][:warmup]),
        sum(replay["padded"][warmup:total]),
    )
    seen = (window["tokens_at_warmup"], window["padded_tokens"])
    if expected != seen:
        raise RuntimeError(
            f"the replayed batches ({expected} padded tokens before/within the timed steps) "
            f"differ from what the trainer logged ({seen}); the token count would be wrong"
        )
    tokens = sum(replay["real"][warmup:total])
    from data.objectives.summarize import build_example, collate
    from model.config import MiniTuringConfig
    from model.transformer import MiniTuringModel

    config = MiniTuringConfig.from_pretrained(out)
    # FLOPs per token on a full-length batch, framed and padded as the trainer's are.
    sources, targets = _full_length_pairs(spec, spec["seed"])
    lengths = {"source_len": part["source_len"], "target_len": part["target_len"]}
    examples = [
        build_example(src.numpy(), tgt.numpy(), cls_id=config.bos_token_id,
                      sep_id=config.eos_token_id, **lengths)
        for src, tgt in zip(sources, targets, strict=True)
    ]  # fmt: skip
    batch = {
        k: torch.from_numpy(v).to(spec["device"])
        for k, v in collate(examples, config.pad_token_id).items()
    }
    model = MiniTuringModel(config).to(spec["device"]).train()
    per_token = counted_flops_per_token(
        lambda: model(**batch).loss, int(batch["attention_mask"].sum())
    )
    return {
        **window,
        "tokens": tokens,
        "tokens_per_s": tokens / window["seconds"],
        "padding_share": 1 - sum(replay["nonpad"][warmup:total]) / window["padded_tokens"],
        "params": config.num_parameters(),
        "flops_per_token": per_token,
        "flags": flags,
        **memory,
    }


def _bart_config(spec: dict, tokenizer):
    from transformers import BartConfig

    shape, ids = spec["shape"], _special(tokenizer)
    enc, dec = spec["seq2seq"]["bart_layers"]
    return BartConfig(
        **_hf_model_config_common(spec, ids),
        d_model=shape["hidden_size"],
        encoder_layers=enc,
        decoder_layers=dec,
        encoder_attention_heads=shape["num_heads"],
        decoder_attention_heads=shape["num_heads"],
        encoder_ffn_dim=shape["ffn_size"],
        decoder_ffn_dim=shape["ffn_size"],
        max_position_embeddings=shape["max_positions"],
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        bos_token_id=ids.cls,
        eos_token_id=ids.sep,
        decoder_start_token_id=ids.cls,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )


def _bart(spec: dict, tokenizer):
    from transformers import BartForConditionalGeneration

    torch.manual_seed(spec["seed"])
    return BartForConditionalGeneration._from_config(
        _bart_config(spec, tokenizer), attn_implementation="sdpa"
    )


def _sampler(group_by_length: bool) -> dict:
    """HF's length-grouped sampler, under its name in this transformers version."""
    import dataclasses

    from transformers import TrainingArguments

    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


def seq2seq_hf(spec: dict) -> dict:
    from datasets import load_from_disk
    from transformers import DataCollatorForSeq2Seq, Trainer

    from data.tokenizer import load_tokenizer

    part = spec["seq2seq"]
    tokenizer = load_tokenizer(spec["tokenizer"])
    model = _bart(spec, tokenizer)
    data = load_from_disk(part["dataset"])
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX)

    # Count what each training forward pass really holds: source tokens (attention mask) plus
    # target tokens (labels), no padding. Kept on the device so counting never syncs.
    # Positions (padding included) are counted too, for the padding share.
    counts: list[torch.Tensor] = []
    positions: list[int] = []

    def count(module, args, kwargs):
        tokens = kwargs["attention_mask"].sum() + (kwargs["labels"] != IGNORE_INDEX).sum()
        counts.append(tokens.detach())
        positions.append(kwargs["input_ids"].numel() + kwargs["labels"].numel())

    model.register_forward_pre_hook(count, with_kwargs=True)
    autocast = watch_autocast(model, spec["device"])
    out = fresh_folder(spec, "hf-seq2seq")
    args, shown = training_arguments(spec, part, out, **_sampler(part["hf_group_by_length"]))
    warmup, total = part["warmup"], part["warmup"] + part["steps"]
    timer = step_timer(spec["device"], warmup, total)
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[timer]
    )
    trainer.train()
    seconds = timer.seconds()
    if len(counts) != total:
        raise RuntimeError(f"expected {total} training forward passes, counted {len(counts)}")
    tokens = int(torch.stack(counts[warmup:total]).sum())
    # FLOPs per token on the full-length batch ours is counted on: no padding on either side.
    sources, targets = (x.to(model.device) for x in _full_length_pairs(spec, spec["seed"]))
    per_token = counted_flops_per_token(
        lambda: (
            model(input_ids=sources, attention_mask=torch.ones_like(sources), labels=targets).loss
        ),
        sources.numel() + targets.numel(),
    )
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "padding_share": 1 - tokens / sum(positions[warmup:total]),
        "params": _n_params(model),
        "flops_per_token": per_token,
        "hf_config": {
            "model": f"BartForConditionalGeneration ({part['bart_layers'][0]} encoder + "
            f"{part['bart_layers'][1]} decoder layers)",
            "attn_implementation": model.config._attn_implementation,
            "autocast_seen": autocast.get("autocast"),
            "collator": "DataCollatorForSeq2Seq(label_pad_token_id=-100)",
            "training_arguments": shown,
        },
    }


# ---------------------------------------------------------------------------- generation


def _time_calls(fn, device: str, repeats: int) -> list[float]:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _gen_autocast(spec: dict):
    import contextlib

    g = spec["generate"]
    if g["precision"] != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(spec["device"]).type, dtype=torch.bfloat16)


def _our_model_config(spec: dict, tokenizer):
    """The config train.py's build_model_config makes for this shape and tokenizer, built here
    so that generation does not import the trainer (whose imports would count as its memory)."""
    from model.config import MiniTuringConfig
    from model.tokenizer import tokenizer_fields

    shape = spec["shape"]
    return MiniTuringConfig.from_preset(
        spec["preset"],
        hidden_size=shape["hidden_size"],
        num_layers=shape["num_layers"],
        num_heads=shape["num_heads"],
        ffn_size=shape["ffn_size"],
        seq_len=shape.get("seq_len"),
        source_len=spec.get("source_len", 256),
        target_len=spec.get("target_len", 48),
        max_position_embeddings=shape["max_positions"],
        **tokenizer_fields(tokenizer),
    )


def generate_ours(spec: dict) -> dict:
    from data.tokenizer import load_tokenizer
    from model.generate import DecodingConfig, generate
    from model.transformer import MiniTuringModel

    g = spec["generate"]
    tokenizer = load_tokenizer(spec["tokenizer"])
    torch.manual_seed(spec["seed"])
    model = MiniTuringModel(_our_model_config(spec, tokenizer)).to(spec["device"]).eval()
    sources = g["sources"]
    results = {}
    for label, beams in g["modes"].items():
        decoding = DecodingConfig(
            max_new_tokens=g["new_tokens"],
            min_new_tokens=g["new_tokens"],
            num_beams=beams,
            no_repeat_ngram_size=g["no_repeat_ngram_size"],
            length_penalty=1.0,
        )
        lengths: list[int] = []

        def run(decoding=decoding, lengths=lengths) -> None:
            with _gen_autocast(spec):
                outs = generate(model, sources, decoding)
            lengths[:] = [len(o) for o in outs]

        times = _time_calls(run, spec["device"], g["repeats"])
        results[label] = {
            "seconds_per_batch": statistics.median(times),
            "times": times,
            "new_tokens": lengths,
        }
    return {"modes": results, "params": _n_params(model)}


def generate_hf(spec: dict) -> dict:
    from transformers import GenerationConfig

    from data.tokenizer import load_tokenizer

    g = spec["generate"]
    tokenizer = load_tokenizer(spec["tokenizer"])
    ids = _special(tokenizer)
    model = _bart(spec, tokenizer).to(spec["device"]).eval()
    sources = g["sources"]
    length = max(len(s) for s in sources)
    input_ids = torch.full((len(sources), length), ids.pad, dtype=torch.long)
    attention = torch.zeros((len(sources), length), dtype=torch.long)
    for i, s in enumerate(sources):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
    input_ids, attention = input_ids.to(spec["device"]), attention.to(spec["device"])
    results = {}
    for label, beams in g["modes"].items():
        gen_config = GenerationConfig(
            max_new_tokens=g["new_tokens"],
            min_new_tokens=g["new_tokens"],
            num_beams=beams,
            no_repeat_ngram_size=g["no_repeat_ngram_size"],
            length_penalty=1.0,
            do_sample=False,
            early_stopping=False,
            bos_token_id=ids.cls,
            eos_token_id=ids.sep,
            pad_token_id=ids.pad,
            decoder_start_token_id=ids.cls,
        )
        lengths: list[int] = []

        def run(gen_config=gen_config, lengths=lengths) -> None:
            with torch.inference_mode(), _gen_autocast(spec):
                out = model.generate(
                    input_ids=input_ids, attention_mask=attention, generation_config=gen_config
                )
            # The first position is the decoder start token, not a generated one.
            lengths[:] = [out.shape[1] - 1] * out.shape[0]

        times = _time_calls(run, spec["device"], g["repeats"])
        results[label] = {
            "seconds_per_batch": statistics.median(times),
            "times": times,
            "new_tokens": lengths,
        }
    return {"modes": results, "params": _n_params(model)}


# ---------------------------------------------------------------------------- entry point

TASKS = {
    "ceiling": ceiling,
    "mlm_ours": mlm_ours,
    "mlm_hf": mlm_hf,
    "seq2seq_ours": seq2seq_ours,
    "seq2seq_hf": seq2seq_hf,
    "generate_ours": generate_ours,
    "generate_hf": generate_hf,
    "quality_hf": quality_hf,
    "quality_ours": quality_ours,
}


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in TASKS:
        raise SystemExit(
            f"usage: python bench/_workers.py {{{','.join(TASKS)}}} SPEC.json RESULT.json"
        )
    task, spec_file, result_file = argv
    spec = json.loads(Path(spec_file).read_text())
    if spec["device"] == "cpu" and spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    result = TASKS[task](spec)
    whole = peak_memory(spec["device"])
    result["peak_mem_mib_process"] = whole["peak_mem_mib"]
    for key, value in whole.items():
        result.setdefault(key, value)
    result["threads"] = torch.get_num_threads()
    result["process_seconds"] = time.perf_counter() - start
    Path(result_file).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
