"""The Hugging Face contestants, BART and BERT at our shape, built once for both races:
``bench/compare.py`` runs each HF side in a process of its own
(``python -m bench.hf {mlm_hf,seq2seq_hf} SPEC.json RESULT.json``), and ``bench/quality.py``
trains them for a wall-clock budget with ``train.py``'s schedule, HF's AdamW defaults, our
regularisation and a byte-level BPE tokenizer of their own.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, load_from_disk
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers import trainers as tok_trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from model.constants import IGNORE_INDEX
from model.tokenizer import load_tokenizer
from trainer.config import OptimConfig
from trainer.metrics import peak_memory_mb
from trainer.optim import lr_at
from trainer.schedule import FIRST_PLAN_AT, REPLAN_EVERY


def hf_model(kind: str, shape: dict, ids: dict, seed: int, layers=None, dropout=0.0,
             attention_dropout=0.0):  # fmt: skip
    """``BertForMaskedLM`` ("bert") at our shape, or ``BartForConditionalGeneration`` ("bart")
    at our width, heads and FFN with ``layers`` (encoder, decoder; its cross-attention adds
    parameters); seeded, sdpa. ``ids``: vocabulary size, pad, bos, eos ids."""
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
    torch.manual_seed(seed)
    cls = BertForMaskedLM if kind == "bert" else BartForConditionalGeneration
    return cls._from_config(config, attn_implementation="sdpa")


def hf_trainer(model, data, collator, out, callbacks, seq2seq: bool = False, **settings):
    """HF's ``Trainer`` (``Seq2SeqTrainer`` with ``seq2seq``) for ``model`` on ``data``, writing
    to ``out``, never evaluating, saving or reporting; ``settings``: the TrainingArguments."""
    arguments, trainer = (Seq2SeqTrainingArguments, Seq2SeqTrainer) if seq2seq else (TrainingArguments, Trainer)  # fmt: skip
    args = arguments(output_dir=str(out), eval_strategy="no", save_strategy="no",
                     report_to="none", disable_tqdm=True, **settings)  # fmt: skip
    return trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                   callbacks=callbacks)  # fmt: skip


# The TrainingArguments of HF's length-grouped sampler (ours buckets pairs by length);
# transformers < 5 names it group_by_length.
GROUPED_BY_LENGTH = {"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__ else {"group_by_length": True}  # fmt: skip
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (a prefix space, so a sentence-initial word is the same token as mid-text),
    with BART's special tokens; ``<mask>`` absorbs the space before it, as RoBERTa's does."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(s, special=True, lstrip=s == "<mask>") for s in SPECIALS]
    trainer = tok_trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", cls_token="<s>", eos_token="</s>", sep_token="</s>",
        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
        model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip


def bart_layers(num_layers: int) -> tuple[int, int]:
    """Our layer count split between encoder and decoder (4 -> 2 + 2)."""
    enc = max(1, num_layers // 2)
    return enc, max(1, num_layers - enc)


def build(kind: str, shape: dict, tokenizer, seed: int, dropout=0.0, attention_dropout=0.0):
    """BART (our layers split, ``bart_layers``) or BERT at our shape, for this tokenizer."""
    ids = {"vocab": len(tokenizer), "pad": tokenizer.pad_token_id,
           "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}  # fmt: skip
    return hf_model(kind, shape, ids, seed, bart_layers(shape["num_layers"]), dropout,
                    attention_dropout)  # fmt: skip


def lr_factor(step: int, total: int) -> float:
    """train.py's schedule (its defaults) as a fraction of the peak."""
    return lr_at(step, total, OptimConfig(lr=1.0))


def _budget_callback(seconds: float, plan: dict, name: str):
    class Budget(TrainerCallback):
        """Fits the schedule after 20 steps and refits it every ``REPLAN_EVERY`` steps from
        the latest steps' speed, as train.py does; stops once ``seconds`` have passed since
        the first step began, or at the end of the schedule."""

        def on_train_begin(self, args, state, control, **kwargs):
            plan["start"] = plan["mark"] = time.perf_counter()
            plan["mark_step"] = 0

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            elapsed, step = now - plan["start"], state.global_step
            if step == FIRST_PLAN_AT or (step > FIRST_PLAN_AT and step % REPLAN_EVERY == 0):
                per_step = (now - plan["mark"]) / (step - plan["mark_step"])
                plan["mark"], plan["mark_step"] = now, step
                plan["total"] = max(step, step + int((seconds - elapsed) / per_step))
                if step == FIRST_PLAN_AT:
                    print(f"  {name} | {step} steps in {elapsed:.0f}s: schedule over "
                          f"{plan['total']} steps", flush=True)  # fmt: skip
            # As train.py: the end of the budget or of the fitted schedule, whichever is first.
            if elapsed >= seconds or step >= plan["total"]:
                control.should_training_stop = True
            plan["steps"], plan["train_seconds"] = step, elapsed

        def on_train_end(self, args, state, control, **kwargs):
            print(f"  {name} | stopped at step {plan['steps']} (planned {plan['total']}) after "
                  f"{plan['train_seconds']:.0f}s", flush=True)  # fmt: skip

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                print(f"  {name} | step {state.global_step}: loss {float(logs['loss']):.3f}, "
                      f"{time.perf_counter() - plan['start']:.0f}s", flush=True)  # fmt: skip

    return Budget()


def _train(model, data, collator, seconds, lr, seed, batch_size, name, **kw):
    """Train ``model`` for ``seconds`` of wall clock; returns steps and seconds trained."""
    max_steps = 10**7  # the callback stops it; the schedule's length comes from the plan
    plan = {"total": max_steps, "max_steps": max_steps, "steps": 0, "train_seconds": 0.0}
    with tempfile.TemporaryDirectory(prefix="quality-hf-") as out:
        trainer = hf_trainer(
            model, data, collator, out, [_budget_callback(seconds, plan, name)],
            max_steps=max_steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            use_cpu=not torch.cuda.is_available(), logging_strategy="steps", logging_steps=50,
            seed=seed, **kw,
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the Budget callback prints the progress
        # The Trainer's own AdamW (parameter groups, HF defaults), with train.py's schedule.
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.create_optimizer(), lambda step: lr_factor(step, plan["total"]))  # fmt: skip
        trainer.train()
    model.eval()
    return {"steps": plan["steps"], "train_seconds": plan["train_seconds"],
            "planned_steps": plan["total"]}  # fmt: skip


def seq2seq_data(pairs, tokenizer, source_len: int, target_len: int):
    """Sources as <s> document </s> (cut to source_len), labels as summary </s> (target_len)."""
    sources = tokenizer([d for d, _ in pairs], truncation=True, max_length=source_len)
    targets = tokenizer([s for _, s in pairs], add_special_tokens=False)["input_ids"]
    labels = [t[: target_len - 1] + [tokenizer.eos_token_id] for t in targets]
    return Dataset.from_dict({**sources, "labels": labels})


def mlm_blocks(texts, tokenizer, seq_len: int):
    """Every text's tokens followed by </s>, one flat stream cut into blocks of <s> + seq_len-1
    tokens (as our masked-LM stream packs them)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = np.fromiter((t for x in ids for t in [*x, tokenizer.eos_token_id]), dtype=np.int64)
    n = len(flat) // (seq_len - 1)
    body = flat[: n * (seq_len - 1)].reshape(n, seq_len - 1)
    blocks = np.concatenate([np.full((n, 1), tokenizer.bos_token_id), body], axis=1)
    return Dataset.from_dict({"input_ids": blocks})


def train_bart(model, data, tokenizer, seconds, lr, seed, batch_size, label_smoothing=0.0):
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX)
    # Length-grouped batches, as ours buckets summarization pairs by length.
    return _train(model, data, collator, seconds, lr, seed, batch_size, "BART", seq2seq=True,
                  label_smoothing_factor=label_smoothing, **GROUPED_BY_LENGTH)  # fmt: skip


def train_bert(model, data, tokenizer, seconds, lr, seed, batch_size, mask_rate=0.15):
    # Token-level masking, 80% <mask> / 10% random / 10% kept: the collator's defaults.
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mask_rate)
    return _train(model, data, collator, seconds, lr, seed, batch_size, "BERT")


@torch.inference_mode()
def bart_summarize(model, tokenizer, docs, *, num_beams, max_new_tokens, source_len,
                   no_repeat_ngram_size, batch_size=16) -> list[str]:  # fmt: skip
    out = []
    for i in range(0, len(docs), batch_size):
        enc = tokenizer(docs[i : i + batch_size], truncation=True, max_length=source_len,
                        padding=True, return_tensors="pt")  # fmt: skip
        ids = model.generate(**enc, num_beams=num_beams, max_new_tokens=max_new_tokens,
                             no_repeat_ngram_size=no_repeat_ngram_size, length_penalty=1.0,
                             do_sample=False)  # fmt: skip
        out += [s.strip() for s in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out


@torch.inference_mode()
def bert_fill(model, tokenizer, texts: list[str], batch_size: int = 32) -> list[str]:
    """The top-1 token for the one ``<mask>`` of each text, decoded and stripped."""
    special = torch.tensor(tokenizer.all_special_ids)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt")
        logits = model(**enc).logits
        logits[..., special] = float("-inf")
        rows, cols = (enc["input_ids"] == tokenizer.mask_token_id).nonzero(as_tuple=True)
        if len(rows) != len(enc["input_ids"]):
            raise ValueError("bert_fill expects exactly one <mask> in each text")
        best = logits[rows, cols].argmax(-1).tolist()
        out += [tokenizer.decode([t]).strip() for t in best]
    return out


# ---------------------------------------------------------------------------- bench/compare.py's side


KINDS = {"mlm_hf": "bert", "seq2seq_hf": "bart"}


def train_hf(spec: dict, kind: str) -> dict:
    """HF's BERT ("bert": packed blocks, every position a token) or BART ("bart": our framed
    pairs, length-grouped) at the benchmark's shape, without dropout as ours trains by default,
    trained with HF's Trainer on the data compare.py prepared; timed from the end of the warm-up
    steps to the end of the last step, its tokens counted as ours counts its own."""
    tokenizer, ids = load_tokenizer(spec["tokenizer"]), spec["ids"]
    ids = {"vocab": spec["shape"]["vocab_size"], "pad": ids["pad"], "bos": ids["cls"], "eos": ids["sep"]}  # fmt: skip
    model = hf_model(kind, spec["shape"], ids, spec["seed"], layers=spec["bart_layers"])
    if kind == "bert":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=spec["mask_rate"])
        count, extra = (lambda kw: (kw["input_ids"].numel(),) * 2), {}
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX)
        count, extra = seq2seq_tokens, GROUPED_BY_LENGTH
    warmup, total = spec["warmup"], spec["warmup"] + spec["steps"]
    marks, counts, autocast = {}, [], {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, total):
                if spec["device"].startswith("cuda"):
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

    def note_autocast(module, args):
        autocast.setdefault("seen", torch.is_autocast_enabled(torch.device(spec["device"]).type))

    model.register_forward_pre_hook(lambda module, args, kw: counts.append(count(kw)), with_kwargs=True)  # fmt: skip
    # On a layer inside: accelerate enters autocast within the forward, after the model's hooks.
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_pre_hook(note_autocast)
    # Matched to train.py's: precision, peak learning rate, warm-up, AdamW betas/eps/decay, fused
    # AdamW, clipping; no logging. A cosine decay to 10%: the schedule costs no step any time.
    shown = dict(
        max_steps=total, per_device_train_batch_size=spec["batch_size"], learning_rate=spec["lr"],
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=spec["lr_warmup"], weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98,
        adam_epsilon=1e-6, max_grad_norm=1.0, optim="adamw_torch_fused",
        bf16=spec["precision"] == "bf16", use_cpu=spec["device"] == "cpu",
        dataloader_num_workers=0, logging_strategy="no", seed=spec["seed"], **extra,
    )  # fmt: skip
    data = load_from_disk(spec["dataset"])
    hf_trainer(model, data, collator, spec["out"], [Timer()], **shown).train()
    if sorted(marks) != [warmup, total] or len(counts) != total:
        raise RuntimeError(f"expected steps {warmup} and {total}, saw {sorted(marks)}")
    tokens = sum(int(t) for t, _ in counts[warmup:])
    positions = sum(int(p) for _, p in counts[warmup:])
    return {
        "seconds": marks[total] - marks[warmup], "tokens": tokens,
        "padding_share": 1 - tokens / positions, "peak_mem_mib": peak_memory_mb(),
        "params": sum(p.numel() for p in model.parameters()), "autocast": autocast.get("seen"),
        "settings": {k: v for k, v in shown.items() if not isinstance(v, dict)},
    }  # fmt: skip


def seq2seq_tokens(kw: dict) -> tuple:
    """A BART batch's tokens as ours counts its own, [CLS] source [SEP] target (the closing
    [SEP] is a label, not an input, in ours), and its input positions, padding included."""
    labels = kw["labels"] != IGNORE_INDEX
    tokens = kw["attention_mask"].sum() + labels.sum() - len(labels)
    return tokens, kw["input_ids"].numel() + labels.numel()


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in KINDS:
        raise SystemExit(f"usage: python -m bench.hf {{{','.join(KINDS)}}} SPEC RESULT")
    task, spec_file, result_file = argv
    spec = json.loads(Path(spec_file).read_text())
    Path(result_file).write_text(json.dumps(train_hf(spec, KINDS[task]), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
