"""What the benchmarks share: running ``train.py`` as a user runs it and reading what it wrote,
and the Hugging Face contestants, BART and BERT at our shape."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Failed(RuntimeError):
    """A child process that did not succeed: why (``why``), and where its log is."""

    def __init__(self, why: str, log: Path) -> None:
        super().__init__(f"{why}; see {log}")
        self.why = why


def run(command: list[str], log: Path, *, timeout=None, env=None, echo=None) -> dict:
    """``command`` in a process of its own, from the repository root, its output in ``log``
    (and printed, each line after ``echo``); the seconds it took and its own peak resident
    memory (``os.wait4``: that child alone). Raises Failed, the log's tail printed, if it fails."""
    start, timed_out = time.perf_counter(), []
    with open(log, "w") as out:
        child = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})},
                                 stdout=subprocess.PIPE if echo else out,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
        timer = threading.Timer(timeout or 0, lambda: (timed_out.append(1), child.kill()))
        if timeout:
            timer.start()
        for line in child.stdout or ():
            out.write(line)
            print(f"{echo} | {line.rstrip()}", flush=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        timer.cancel()
    if child.returncode:
        why = f"timed out after {timeout:.0f}s" if timed_out else f"exit status {child.returncode}"
        tail = log.read_text(errors="replace").strip().splitlines()[-20:]
        print(f" FAILED ({why}); {log}:\n" + "\n".join("      " + x for x in tail), flush=True)
        raise Failed(why, log)
    return {"wall_s": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024}


def run_train(flags: list[str], out: Path, **kwargs) -> dict:
    """``python train.py FLAGS --output-dir OUT`` in a fresh folder, logged to ``OUT.log``
    (``run``'s keywords); its summary.json, with the process's ``wall_s``, ``peak_rss_mib``
    and ``command``."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "train.py", *flags, "--output-dir", str(out)]
    measured = run(command, out.parent / f"{out.name}.log", **kwargs)
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, **measured, "command": command[1:]}


def hf_model(kind: str, shape: dict, ids: dict, seed: int, layers=None, dropout=0.0,
             attention_dropout=0.0):  # fmt: skip
    """Hugging Face's ``BertForMaskedLM`` (``kind`` "bert") at exactly our shape, or
    ``BartForConditionalGeneration`` ("bart") at our width, heads and FFN with ``layers``
    (encoder, decoder): its decoder layers add cross-attention, so it has somewhat more
    parameters than ours. Randomly initialised from ``seed``, sdpa attention. ``ids``: the
    vocabulary size and the pad, bos and eos ids; ``shape``: our config's names."""
    from transformers import BartConfig, BartForConditionalGeneration, BertConfig, BertForMaskedLM

    s, common = shape, {"vocab_size": ids["vocab"], "pad_token_id": ids["pad"]}
    if kind == "bert":
        config = BertConfig(
            **common, hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"],
            num_attention_heads=s["num_heads"], intermediate_size=s["ffn_size"],
            max_position_embeddings=s["max_positions"], hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=attention_dropout,
        )  # fmt: skip
    else:
        config = BartConfig(
            **common, d_model=s["hidden_size"], encoder_layers=layers[0], decoder_layers=layers[1],
            encoder_attention_heads=s["num_heads"], decoder_attention_heads=s["num_heads"],
            encoder_ffn_dim=s["ffn_size"], decoder_ffn_dim=s["ffn_size"],
            max_position_embeddings=s["max_positions"], dropout=dropout,
            attention_dropout=attention_dropout, activation_dropout=0.0, bos_token_id=ids["bos"],
            eos_token_id=ids["eos"], decoder_start_token_id=ids["bos"], forced_bos_token_id=None,
            forced_eos_token_id=None,
        )  # fmt: skip
    import torch

    torch.manual_seed(seed)
    cls = BertForMaskedLM if kind == "bert" else BartForConditionalGeneration
    return cls._from_config(config, attn_implementation="sdpa")


def hf_trainer(model, data, collator, out, callbacks, seq2seq: bool = False, **settings):
    """HF's ``Trainer`` (``Seq2SeqTrainer`` with ``seq2seq``) for ``model`` on ``data``, writing
    to ``out``, never evaluating, saving or reporting; ``settings``: the TrainingArguments."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

    arguments, trainer = (Seq2SeqTrainingArguments, Seq2SeqTrainer) if seq2seq else (TrainingArguments, Trainer)  # fmt: skip
    args = arguments(output_dir=str(out), eval_strategy="no", save_strategy="no",
                     report_to="none", disable_tqdm=True, **settings)  # fmt: skip
    return trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                   callbacks=callbacks)  # fmt: skip


def grouped_by_length() -> dict:
    """The TrainingArguments of HF's length-grouped sampler (ours buckets pairs by length);
    transformers < 5 names it ``group_by_length``."""
    from transformers import TrainingArguments

    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def table(rows: list[tuple[str, ...]], rule: bool = False) -> str:
    """Columns padded to their widest cell, two spaces apart; a dashed rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [*rows[:1], *([tuple("-" * w for w in widths)] if rule else []), *rows[1:]]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
                     for x in lines)  # fmt: skip
