"""Held-out evaluation, shared by the trainer's periodic evaluation and ``python -m model
evaluate``: masked-token accuracy and perplexity, summarization loss, and ROUGE-1/2/L of
generated summaries."""

from __future__ import annotations

import math

import numpy as np
import torch
from rouge_score import rouge_scorer

from model.generate import DecodingConfig, generate
from model.transformer import IGNORE_INDEX, MiniTuringModel

EVAL_SEED = 1234


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) with the rouge-score package (Porter stemming)."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {k: 100 * v / n for k, v in totals.items()}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def stream_metrics(
    model: MiniTuringModel, stream, batch_size: int, max_batches: int
) -> dict[str, float]:
    """Token-weighted loss over the first examples of a held-out stream (fixed masks), plus
    accuracy of the predictions at labelled positions."""
    n = len(stream)
    total_loss, total_tokens, correct = 0.0, 0, 0
    device = _device(model)
    for b in range(min(max_batches, math.ceil(n / batch_size))):
        indices = np.arange(b * batch_size, min((b + 1) * batch_size, n))
        batch = stream.batch(indices, indices, EVAL_SEED)
        batch = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        out = model(**batch)
        count = int(out.num_label_tokens)
        total_loss += float(out.loss) * count
        total_tokens += count
        targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
        correct += int((out.logits.argmax(-1) == targets).sum())
    if total_tokens == 0:
        return {}
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "accuracy": correct / total_tokens}


def evaluate(
    model: MiniTuringModel,
    tokenizer,
    streams: dict,
    *,
    batch_size: int = 32,
    max_batches: int = 8,
    rouge_samples: int = 32,
    decoding: DecodingConfig | None = None,
) -> dict[str, float]:
    """Metrics per objective, named ``objective/metric``."""
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    try:
        for name, stream in streams.items():
            if len(stream) == 0:
                continue
            for key, value in stream_metrics(model, stream, batch_size, max_batches).items():
                if name != "masked_lm" and key == "accuracy":
                    key = "token_accuracy"
                results[f"{name}/{key}"] = value
        summaries = streams.get("summarize")
        if summaries is not None and rouge_samples > 0 and len(summaries):
            count = min(rouge_samples, len(summaries))
            sources = []
            for i in range(count):
                ids, labels, prefix = summaries.example(i)
                sources.append(ids[:prefix].tolist())
            cfg = decoding or DecodingConfig(max_new_tokens=summaries.target_len, num_beams=1)
            predictions = []
            for start in range(0, count, batch_size):
                outs = generate(model, sources[start : start + batch_size], cfg)
                predictions += tokenizer.batch_decode(outs, skip_special_tokens=True)
            references = [
                tokenizer.decode(summaries.targets[i], skip_special_tokens=True)
                for i in range(count)
            ]
            references = [r.strip() for r in references]
            for key, value in rouge([p.strip() for p in predictions], references).items():
                results[f"summarize/{key}"] = value
            # Lead baseline: the document's first words, as many as the reference has.
            documents = [
                tokenizer.decode(s[1:-1], skip_special_tokens=True).split() for s in sources
            ]
            leads = [
                " ".join(d[: len(r.split())]) for d, r in zip(documents, references, strict=True)
            ]
            for key, value in rouge(leads, references).items():
                results[f"summarize/lead_{key}"] = value
    finally:
        model.train(was_training)
    return results
