"""Early stopping (``--patience N``): a run whose validation score has not improved in N
periodic evaluations in a row stops early, but not cold: it enters its decay phase at once,
bringing the learning rate down to its floor over a short final stretch, then ends as a run
ends (the final evaluations, checkpoint and summary.json).

The rule: the stretch is ``--decay-share`` of the steps done so far (at least one), ending no
later than the plan (``--max-steps`` or the time budget's). An improvement is what
``keep.keep_if_best`` keeps: strictly better than the kept score; a tie or a non-finite score
is not one. The count and the decision are part of the training state (``TrainState``), so a
resumed run stops where the uninterrupted one does; every rank counts from rank 0's score, so
all ranks agree.
"""

from __future__ import annotations

from trainer.distributed import rank0_value
from trainer.errors import TrainingError
from trainer.prepare import Run, TrainState


def count(without_improvement: int, improved: bool) -> int:
    """The evaluations in a row without an improvement, after one more evaluation."""
    return 0 if improved else without_improvement + 1


def decay_steps(step: int, planned: int, decay_share: float) -> int:
    """The final stretch's length when patience runs out after ``step`` of a run planned for
    ``planned``: ``decay_share`` of the steps done, at least one, within the plan."""
    return max(0, min(max(1, round(decay_share * step)), planned - step))


def check_validation(run: Run, rule: tuple[str, bool] | None) -> None:
    """Once the data is read: the validation split may still have come out empty."""
    if run.cfg.run.patience and rule is None:
        raise TrainingError(
            f"--patience {run.cfg.run.patience} needs validation evaluations, but the "
            "validation split is empty (too little training data for --val-fraction "
            f"{run.cfg.data.val_fraction}); use more data or leave out --patience"
        )


def after_evaluation(state: TrainState, improved: bool) -> None:
    """Count one periodic validation evaluation (a run already in its final decay goes on
    counting, for the record only)."""
    state.evaluations_without_improvement = count(state.evaluations_without_improvement, improved)


def ran_out(run: Run) -> bool:
    """Whether patience has run out now (once: never again in the final decay)."""
    patience, state = run.cfg.run.patience, run.state
    if not patience or state.stopping is not None:
        return False
    return state.evaluations_without_improvement >= patience


def begin_final_decay(run: Run, planned: int) -> int:
    """Patience ran out after this step of a run planned for ``planned`` steps: record the
    decision in the state and return the step the run now ends at."""
    state = run.state
    steps = decay_steps(state.step, planned, run.cfg.optim.decay_share)
    end = int(rank0_value(state.step + steps, run.env))
    state.stopping = {
        "reason": "patience",
        "step": state.step,
        "evaluations_without_improvement": state.evaluations_without_improvement,
        "planned_steps": planned,
        "decay_steps": end - state.step,
        "end": end,
        # The rate the decay starts from: the latest step's (JSON keeps a float exactly).
        "lr": run.optimizer.param_groups[0]["lr"],
    }
    return end


def announcement(state: TrainState, kept: dict | None) -> str:
    """The log line when patience runs out."""
    s = state.stopping
    best = f" (best {kept['metric']} {kept['value']:.4g} at step {kept['step']})" if kept else ""
    return (
        f"patience: no validation improvement in {s['evaluations_without_improvement']} "
        f"evaluations{best}; decaying the learning rate to its floor over {s['decay_steps']} "
        f"steps, then stopping at step {s['end']} of the {s['planned_steps']} planned"
    )


def stopped_line(state: TrainState) -> str:
    """The closing line's reason for a run that patience ended."""
    s = state.stopping
    return (
        f"stopped early by --patience: no validation improvement in "
        f"{s['evaluations_without_improvement']} evaluations by step {s['step']}, then "
        f"{s['decay_steps']} steps of learning-rate decay"
    )


def stopped_summary(state: TrainState) -> dict | None:
    """What summary.json says of an early stop: why, when it was decided, and where the run
    ended; None for a run that trained to its plan."""
    s = state.stopping
    if s is None:
        return None
    return {
        "reason": s["reason"],
        "step": s["step"],
        "evaluations_without_improvement": s["evaluations_without_improvement"],
        "decay_steps": s["decay_steps"],
        "planned_steps": s["planned_steps"],
        "ended_at": state.step,
    }
