"""Which weights a run keeps as RUN/model.safetensors.

During the run, those of its best evaluation on the validation split so far
(``evaluate.SELECTION_RULE``). At the end, the last weights, unless that best evaluation beats
the final one by more than ``evaluate.SELECTION_MARGIN`` paired standard errors: the best of
many noisy evaluations is flattered by its own noise (docs/performance.md, "Checkpoint
selection: the last weights unless clearly beaten": over fourteen runs with few pairs the rule
kept the last weights, +0.71 +- 0.27 ROUGE-L a run on held-out pairs over the best
evaluation's). Without periodic evaluations or a validation split, the last
weights. The kept evaluation (step, metric, value, per-example samples) is part of the training
state, so a resumed run goes on choosing as the uninterrupted one would.
"""

from __future__ import annotations

import math

import numpy as np

from trainer.checkpoint import save_kept_weights
from trainer.distributed import rank0_value
from trainer.evaluate import SELECTION_MARGIN, SELECTION_RULE, Evaluation, selection_metric
from trainer.prepare import Run


def selection(run: Run) -> tuple[str, bool] | None:
    """The validation metric that picks the kept weights and whether higher is better
    (``evaluate.SELECTION_RULE``); None without periodic evaluations or a validation split:
    the last weights are kept."""
    if not run.cfg.run.eval_every:
        return None
    return selection_metric(run.data.streams.val, run.cfg.run.rouge_samples)


def paired_se(a: list[list[float]], b: list[list[float]]) -> float | None:
    """The standard error of (mean of a's group means) - (mean of b's), pairing the groups'
    values one by one; None when they do not pair (other shapes, or a group of one)."""
    if not a or len(a) != len(b):
        return None
    pairs = list(zip(a, b, strict=True))
    if any(len(x) != len(y) or len(x) < 2 for x, y in pairs):
        return None
    var = sum(np.var(np.subtract(x, y), ddof=1) / len(x) for x, y in pairs)
    return math.sqrt(var) / len(a)


def _keep_now(run: Run, metric: str, value: float, results: Evaluation) -> None:
    """The weights now as RUN/model.safetensors, and their evaluation (with the samples that
    the end's comparison pairs against) as the state's kept record."""
    save_kept_weights(run.checkpointer, run.model, run.env)
    samples = results.samples.get(metric)
    run.state.kept = {"step": run.state.step, "metric": f"val/{metric}", "value": value}
    if samples:
        run.state.kept["samples"] = samples


def keep_if_best(run: Run, results: Evaluation, rule: tuple[str, bool]) -> bool:
    """Keep the weights now as RUN/model.safetensors if this validation score is the best so
    far (rank 0's score decides on every rank; a non-finite score never wins, nor does a tie);
    whether it was (--patience counts the evaluations that were not)."""
    metric, higher = rule
    value = rank0_value(results.get(metric, math.nan), run.env)
    kept = run.state.kept
    if not math.isfinite(value):
        return False
    if kept is None or (value > kept["value"] if higher else value < kept["value"]):
        _keep_now(run, metric, value, results)
        return True
    return False


def keep_at_end(run: Run, results: Evaluation, rule: tuple[str, bool]) -> None:
    """The final validation evaluation: keep the last weights unless the best earlier one
    beats them by more than ``SELECTION_MARGIN`` paired standard errors (without samples that
    pair, as in a state saved before samples were kept, by any lead; a tie goes to the last
    weights). Rank 0's numbers decide on every rank. Why goes to the kept record, for
    summary.json."""
    metric, higher = rule
    env, kept = run.env, run.state.kept
    last = rank0_value(results.get(metric, math.nan), env)
    if kept is None:
        if math.isfinite(last):
            _keep_now(run, metric, last, results)
            run.state.kept["why"] = "the last weights: no earlier finite validation score"
        return
    if not math.isfinite(last):
        kept["why"] = f"the best {kept['metric']} of the evaluations: the last one is not finite"
        return
    lead = (kept["value"] - last) * (1 if higher else -1)
    se = paired_se(kept.get("samples", []), results.samples.get(metric, []))
    se = rank0_value(math.nan if se is None else se, env)  # (FSDP: rank 0 has ROUGE samples)
    by = f"{lead:.4g} +- {se:.3g}" if math.isfinite(se) else f"{lead:.4g} (no paired samples)"
    earlier_wins = lead > SELECTION_MARGIN * se if math.isfinite(se) else lead > 0
    if earlier_wins:
        margin = f", more than {SELECTION_MARGIN:g} standard errors" if math.isfinite(se) else ""
        kept["why"] = (
            f"the best {kept['metric']} of the evaluations: it beats the last weights' "
            f"({last:.4g}) by {by}{margin}"
        )
        return
    best = f"step {kept['step']}, {kept['value']:.4g}"
    _keep_now(run, metric, last, results)
    run.state.kept["why"] = (
        f"the last weights: the best {kept['metric']} of the evaluations"
        if lead <= 0
        else f"the last weights: the best earlier evaluation ({best}) leads them by {by}, "
        f"not more than {SELECTION_MARGIN:g} standard errors"
    )


def kept_summary(run: Run) -> dict:
    """What summary.json says of the kept weights: their step, and why."""
    kept, rule = run.state.kept, selection(run)
    if rule is None or kept is None:
        why = (
            "no periodic evaluation (--eval-every 0)" if not run.cfg.run.eval_every
            else "no validation split (--val-fraction 0)" if rule is None
            else "no finite validation score"
        )  # fmt: skip
        return {"step": run.state.step, "why": f"the last weights: {why}"}
    shown = {k: v for k, v in kept.items() if k != "samples"}
    return {"why": f"the best {kept['metric']} of the evaluations", **shown, "rule": SELECTION_RULE}
