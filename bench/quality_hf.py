"""The Hugging Face contestants of ``bench/quality.py``: a byte-level BPE tokenizer, BART
(``Seq2SeqTrainer``) and BERT (``Trainer`` + ``DataCollatorForLanguageModeling``) trained from
scratch for a wall-clock budget with ``train.py``'s schedule, HF's AdamW defaults and our
regularisation; then beam-search summaries and top-1 mask fills.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from bench.common import grouped_by_length, hf_model, hf_trainer
from model.constants import IGNORE_INDEX
from trainer.config import OptimConfig
from trainer.optim import lr_at
from trainer.schedule import FIRST_PLAN_AT, REPLAN_EVERY

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (a prefix space, so a sentence-initial word is the same token as mid-text),
    with BART's special tokens; ``<mask>`` absorbs the space before it, as RoBERTa's does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers import trainers as tok_trainers
    from transformers import PreTrainedTokenizerFast

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
    from transformers import TrainerCallback

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
    from transformers import PrinterCallback

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
    from datasets import Dataset

    sources = tokenizer([d for d, _ in pairs], truncation=True, max_length=source_len)
    targets = tokenizer([s for _, s in pairs], add_special_tokens=False)["input_ids"]
    labels = [t[: target_len - 1] + [tokenizer.eos_token_id] for t in targets]
    return Dataset.from_dict({**sources, "labels": labels})


def mlm_blocks(texts, tokenizer, seq_len: int):
    """Every text's tokens followed by </s>, one flat stream cut into blocks of <s> + seq_len-1
    tokens (as our masked-LM stream packs them)."""
    from datasets import Dataset

    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = np.fromiter((t for x in ids for t in [*x, tokenizer.eos_token_id]), dtype=np.int64)
    n = len(flat) // (seq_len - 1)
    body = flat[: n * (seq_len - 1)].reshape(n, seq_len - 1)
    blocks = np.concatenate([np.full((n, 1), tokenizer.bos_token_id), body], axis=1)
    return Dataset.from_dict({"input_ids": blocks})


def train_bart(model, data, tokenizer, seconds, lr, seed, batch_size, label_smoothing=0.0):
    from transformers import DataCollatorForSeq2Seq

    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX)
    # Length-grouped batches, as ours buckets summarization pairs by length.
    return _train(model, data, collator, seconds, lr, seed, batch_size, "BART", seq2seq=True,
                  label_smoothing_factor=label_smoothing, **grouped_by_length())  # fmt: skip


def train_bert(model, data, tokenizer, seconds, lr, seed, batch_size, mask_rate=0.15):
    from transformers import DataCollatorForLanguageModeling

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
