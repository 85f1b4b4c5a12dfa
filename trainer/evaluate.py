"""Held-out evaluation, one evaluator for the trainer's periodic evaluation and for
``minituring evaluate``: masked-token accuracy and perplexity, teacher-forced loss of the
sequence-to-sequence objectives, and ROUGE-1/2/L of generated summaries against the lead
baseline, for ``summarize`` and for each named text-to-text task (``title/rougeL``, ...).

It is rank-aware, and one process is the ordinary case of N: rank r takes the held-out batches
r, r + N, ... (the same batches and masks one process would use) and token-weighted sums are
all-reduced, so the numbers do not depend on the number of processes.

Beside the metrics, an evaluation keeps the per-example values behind those that can pick the
kept weights (``Evaluation.samples``), so two evaluations of one split can be compared with a
paired standard error (``trainer/keep.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from rouge_score import rouge_scorer

from data.objectives import is_task
from model.constants import IGNORE_INDEX
from model.generate import DecodingConfig, generate
from model.transformer import MiniTuringModel
from trainer.distributed import Env, autocast, full_state_dict, is_fsdp

EVAL_SEED = 1234
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
_SCORER = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
# Documents an evaluation decodes at once on a CPU. Beam search holds keys and values for every
# document, beam and position; on two cores 8 documents decode as fast as 32 (192 documents,
# beam 4: 5.6-6.0 s against 5.5-6.1 s, the same summaries) with 146-189 MiB less at the peak.
# A GPU decodes the evaluation's whole batch at once.
CPU_DECODE_BATCH = 8


def rouge_scores(prediction: str, reference: str) -> list[float]:
    """ROUGE-1/2/L F1 (x100) of one prediction, with the rouge-score package (Porter stemming)."""
    scores = _SCORER.score(reference, prediction)
    return [100 * scores[key].fmeasure for key in ROUGE_KEYS]


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100)."""
    rows = [rouge_scores(p, r) for p, r in zip(predictions, references, strict=True)]
    means = np.mean(rows, axis=0) if rows else np.zeros(len(ROUGE_KEYS))
    return dict(zip(ROUGE_KEYS, means.tolist(), strict=True))


# How many paired standard errors the best earlier validation evaluation must beat the final
# one by for its weights to be kept instead of the last ones (trainer/keep.py).
SELECTION_MARGIN = 2.0
SELECTION_RULE = (
    "validation ROUGE-L of the summaries (higher is better) when summarize trains and "
    "--rouge-samples > 0, the product skill (with named tasks, the mean ROUGE-L of the tasks, "
    "tasks/rougeL; a named task alone, its own); else the validation loss (lower is better) of "
    "masked_lm, else of gap_summary, else of summarize, else of the first named task; the "
    "best evaluation's weights are kept during the run, and at the end the last weights unless "
    f"the best earlier evaluation beats the final one by more than {SELECTION_MARGIN:g} paired "
    "standard errors"
)
# The key of the tasks' mean ROUGE-L, when a run has several.
TASKS_MEAN = "tasks/rougeL"


class Evaluation(dict):
    """An evaluation's metrics by name (``objective/metric``: a plain dict of floats) and, in
    ``samples``, the per-example values behind each metric that can pick the kept weights, as
    groups whose means the metric averages: ROUGE-L, one group of per-document scores (the tasks'
    mean: one group per task); a loss, one group of per-batch losses. The examples and their
    masks are fixed, so two evaluations of one split pair up value by value. Under FSDP only
    rank 0 has the ROUGE samples."""

    def __init__(self, metrics: dict | None = None, samples: dict | None = None):
        super().__init__(metrics or {})
        self.samples: dict[str, list[list[float]]] = samples or {}


def task_names(streams: dict) -> list[str]:
    """The text-to-text tasks among ``streams``' objectives: summarize first, then the others."""
    names = [n for n in streams if is_task(n)]
    return sorted(names, key=lambda n: n != "summarize")


def selection_metric(val_streams: dict, rouge_samples: int) -> tuple[str, bool] | None:
    """The validation metric that picks the kept weights (:data:`SELECTION_RULE`) and whether
    higher is better; None without a validation split."""
    present = [name for name, stream in val_streams.items() if len(stream)]
    tasks = task_names({n: None for n in present})
    if tasks and rouge_samples > 0:
        return (f"{tasks[0]}/rougeL" if len(tasks) == 1 else TASKS_MEAN), True
    for name in ("masked_lm", "gap_summary", *tasks):
        if name in present:
            return f"{name}/loss", False
    return None


def evaluation_work(streams: dict, batch_size: int, max_batches: int, rouge_samples: int) -> int:
    """What one ``evaluate`` of ``streams`` does, in the unit that dominates its time: the
    documents it summarizes for ROUGE (beam search, a forward per new token and beam), else the
    examples it scores for loss and accuracy. The plan scales a timed evaluation by it to the
    cost of another split's."""
    tasks = task_names({name: None for name, stream in streams.items() if len(stream)})
    decoded = (
        sum(min(rouge_samples, len(streams[task])) for task in tasks) if rouge_samples > 0 else 0
    )
    if decoded:
        return decoded
    return sum(min(len(s), max_batches * batch_size) for s in streams.values())


def _one_process(model: torch.nn.Module) -> Env:
    return Env(next(model.parameters()).device, None)


@torch.no_grad()
def evaluate(
    model: MiniTuringModel,
    tokenizer,
    streams: dict,
    *,
    batch_size: int = 32,
    max_batches: int = 8,
    rouge_samples: int = 32,
    decoding: DecodingConfig | dict[str, DecodingConfig] | None = None,
    env: Env | None = None,
) -> Evaluation:
    """Metrics per objective, named ``objective/metric``, with their samples
    (:class:`Evaluation`). Every rank calls it; every rank gets the same numbers.
    ``max_batches`` counts global batches (batch size x processes), as one process with the
    global batch would evaluate them. ROUGE is taken for each task
    (``summarize`` and the named ones) on its first ``rouge_samples`` pairs, decoded as
    ``decoding`` says (one config, or one per task); with several tasks, ``tasks/rougeL`` is
    their mean ROUGE-L."""
    env = env or _one_process(model)
    was_training = model.training
    model.eval()
    try:
        with autocast(env):
            results = _stream_metrics(model, streams, batch_size, max_batches, env)
            scored = []
            for task in task_names(streams):
                pairs = streams[task]
                if rouge_samples <= 0 or not len(pairs):
                    continue
                count = min(rouge_samples, len(pairs))
                cfg = decoding.get(task) if isinstance(decoding, dict) else decoding
                means, documents = _rouge(
                    model, tokenizer, pairs, count, batch_size, cfg, env, task=task
                )
                results.update(means)
                if documents:
                    results.samples[f"{task}/rougeL"] = [documents]
                scored.append(task)
            if len(scored) > 1 and all(f"{t}/rougeL" in results for t in scored):
                results[TASKS_MEAN] = float(np.mean([results[f"{t}/rougeL"] for t in scored]))
                results.samples[TASKS_MEAN] = [
                    group for t in scored for group in results.samples.get(f"{t}/rougeL", [])
                ]
    finally:
        model.train(was_training)
    return results


def _stream_metrics(
    model, streams: dict, batch_size: int, max_batches: int, env: Env
) -> Evaluation:
    """Token-weighted loss and accuracy at the labelled positions, with the fixed masks of
    ``EVAL_SEED``, and each batch's loss as the loss's samples. Under FSDP each forward gathers
    weights collectively, so every rank runs the same number of them: a rank short of batches
    repeats its first one and ignores the result."""
    names = [n for n, s in streams.items() if len(s)]
    batches = [
        min(max_batches * env.world_size, math.ceil(len(streams[n]) / batch_size)) for n in names
    ]
    # Per objective and batch: loss x tokens, tokens, correct.
    sums = torch.zeros(len(names), max(batches, default=0), 3, dtype=torch.float64)
    for j, (name, num_batches) in enumerate(zip(names, batches, strict=True)):
        stream = streams[name]
        n = len(stream)
        mine: list[int | None] = list(range(env.rank, num_batches, env.world_size))
        if is_fsdp(model):
            mine += [None] * (math.ceil(num_batches / env.world_size) - len(mine))
        for b in mine:
            start = (b or 0) * batch_size
            indices = np.arange(start, min(start + batch_size, n))
            arrays = stream.batch(indices, indices, EVAL_SEED)
            batch = {k: torch.from_numpy(v).to(env.device) for k, v in arrays.items()}
            out = model(**batch)
            if b is None:
                continue
            labels = batch["labels"]
            correct = (out.logits.argmax(-1) == labels[labels != IGNORE_INDEX]).sum()
            count = int(out.num_label_tokens)
            sums[j, b] = torch.tensor([float(out.loss) * count, count, int(correct)])
    if env.distributed:
        sums = sums.to(env.device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
    results = Evaluation()
    for j, name in enumerate(names):
        loss_sum, tokens, correct = sums[j].sum(0).tolist()
        if tokens == 0:
            continue
        loss = loss_sum / tokens
        accuracy = "accuracy" if name == "masked_lm" else "token_accuracy"
        results[f"{name}/loss"] = loss
        results[f"{name}/perplexity"] = math.exp(min(loss, 50))
        results[f"{name}/{accuracy}"] = correct / tokens
        per_batch = sums[j, : batches[j]]
        counted = per_batch[per_batch[:, 1] > 0]
        results.samples[f"{name}/loss"] = [(counted[:, 0] / counted[:, 1]).tolist()]
    return results


def _rouge(
    model, tokenizer, summaries, count, batch_size, decoding, env: Env, task: str = "summarize"
) -> tuple[dict, list[float]]:
    """ROUGE of ``task``'s outputs for the first ``count`` held-out sources, and of the lead
    baseline (the source's first words, as many as the reference has), as ``task/rouge1``...;
    and the ROUGE-L of each document, in order (empty on ranks other than 0 under FSDP).

    DDP (or one process): each rank summarizes every N-th document with its own replica, and
    per-document scores are gathered. FSDP: decoding runs a data-dependent number of forward
    passes, which sharded weights cannot follow rank by rank, so the full weights are gathered
    onto rank 0's CPU and rank 0 decodes alone.
    """
    fsdp = is_fsdp(model)
    if fsdp:
        weights = full_state_dict(model)  # collective
        if not env.main:
            return {}, []
        with torch.device("meta"):
            replica = MiniTuringModel(model.config)
        replica.load_state_dict(weights, assign=True)
        model, mine = replica.to(env.device).eval(), list(range(count))
    else:
        mine = list(range(env.rank, count, env.world_size))
    cfg = decoding or DecodingConfig(max_new_tokens=summaries.target_len, num_beams=1)
    sources = []
    for i in mine:
        ids, _, prefix = summaries.example(i)
        sources.append(ids[:prefix].tolist())
    predictions = []
    step = min(batch_size, CPU_DECODE_BATCH) if env.device.type == "cpu" else batch_size
    for start in range(0, len(sources), step):
        outs = generate(model, sources[start : start + step], cfg)
        predictions += tokenizer.batch_decode(outs, skip_special_tokens=True)
    rows = []
    for source, prediction, i in zip(sources, predictions, mine, strict=True):
        reference = tokenizer.decode(summaries.targets[i], skip_special_tokens=True).strip()
        # (A named task's token is special: decoding leaves it out.)
        words = tokenizer.decode(source[1:-1], skip_special_tokens=True).split()
        lead = " ".join(words[: len(reference.split())])
        rows.append(
            (i, rouge_scores(prediction.strip(), reference) + rouge_scores(lead, reference))
        )
    if env.distributed and not fsdp:
        gathered: list = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, rows)
        rows = sorted(row for part in gathered for row in part)  # in document order
    rows = [row for _, row in rows]
    means = np.mean(rows, axis=0).tolist()
    keys = [f"{task}/{k}" for k in ROUGE_KEYS] + [f"{task}/lead_{k}" for k in ROUGE_KEYS]
    return dict(zip(keys, means, strict=True)), [row[ROUGE_KEYS.index("rougeL")] for row in rows]
