"""Which weights a run keeps as RUN/model.safetensors: those of its best evaluation on the
validation split (``evaluate.SELECTION_RULE``), or, without periodic evaluations or a
validation split, the last ones. The kept evaluation (step, metric, value) is part of the
training state, so a resumed run goes on choosing as the uninterrupted one would."""

from __future__ import annotations

import math

from trainer.checkpoint import save_kept_weights
from trainer.distributed import rank0_value
from trainer.evaluate import SELECTION_RULE, selection_metric
from trainer.prepare import Run


def selection(run: Run) -> tuple[str, bool] | None:
    """The validation metric that picks the kept weights and whether higher is better
    (``evaluate.SELECTION_RULE``); None without periodic evaluations or a validation split:
    the last weights are kept."""
    if not run.cfg.run.eval_every:
        return None
    return selection_metric(run.data.streams.val, run.cfg.run.rouge_samples)


def keep_if_best(run: Run, results: dict, rule: tuple[str, bool]) -> bool:
    """Keep the weights now as RUN/model.safetensors if this validation score is the best so
    far (rank 0's score decides on every rank; a non-finite score never wins, nor does a tie);
    whether it was (--patience counts the evaluations that were not)."""
    metric, higher = rule
    value = rank0_value(results.get(metric, math.nan), run.env)
    kept = run.state.kept
    if not math.isfinite(value):
        return False
    if kept is None or (value > kept["value"] if higher else value < kept["value"]):
        save_kept_weights(run.checkpointer, run.model, run.env)
        run.state.kept = {"step": run.state.step, "metric": f"val/{metric}", "value": value}
        return True
    return False


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
    return {**kept, "why": f"the best {kept['metric']} of the evaluations", "rule": SELECTION_RULE}
