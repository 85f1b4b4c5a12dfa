"""How long a run trains: the plan the learning-rate schedule is drawn over.

Without a time budget the plan is ``--max-steps``. With neither, a run is ``DEFAULT_STEPS`` or
``DEFAULT_BUDGET`` seconds, whichever ends first, so the default job is minutes on any machine.
With a budget, the whole run (the command's start-up, data preparation, steps, evaluations and
checkpoints) must end within it, and the schedule must end with it: the plan is fitted once the
speed is known (a first guess at step ``EARLY_PLAN_AT``, then step ``FIRST_PLAN_AT``) and
refitted every ``REPLAN_EVERY`` steps from the measured cost of a step, of an evaluation and of
a checkpoint, keeping back what the final evaluation and checkpoint will take. The plan is
saved with every checkpoint (``planned_steps``), so a resumed run continues it.
"""

from __future__ import annotations

import math

# Nine minutes: the default job (python train.py) with the samples it prints after training
# ends within ten, on the slower of the 2-core machines measured (1.3 s a step: about 430 steps)
# as on the faster (0.3 s: about 1,700). The step cap only stops a much faster machine (a GPU)
# from taking the whole nine minutes for a demonstration: 2,000 steps is five or six passes over
# the embedded corpus's summary pairs at the default mixture.
DEFAULT_STEPS = 2000
DEFAULT_BUDGET = 540.0
EARLY_PLAN_AT = 5  # a first guess, so that even a budget of a few steps gets a whole schedule
FIRST_PLAN_AT = 20
REPLAN_EVERY = 50
# Until an evaluation and a checkpoint have been timed, the final ones are assumed to take this
# share of the budget.
UNMEASURED_FINAL_SHARE = 0.03
# Once timed, they are kept back with a quarter more than the latest ones took: the final
# evaluation's summaries can be longer than the last periodic one's (a 30-minute run that kept
# back exactly the latest ended 0.97 s past its budget).
FINAL_MARGIN = 1.25
# The samples a command run ends with (trainer.samples: the run folder loaded, three fill-masks,
# one summary, one per named task) are kept back as this share of an evaluation, which decodes a
# few hundred summaries; in the default job they took 0.19 s (summary.json's samples_seconds).
SAMPLES_SHARE = 0.05
# The training curves are redrawn with a checkpoint at most this often (0.5 s a drawing, 1 to 5
# s for the first one in a process, which imports matplotlib).
REDRAW_SECONDS = 60.0
WARMUP_STEPS = 3  # this process's first steps, left out of the speed (warm-up)


class Plan:
    def __init__(self, budget: float | None, cap: int | None, planned: int | None) -> None:
        if budget is None and cap is None:
            budget, cap = DEFAULT_BUDGET, DEFAULT_STEPS
        self.budget, self.cap = budget, cap
        # A saved plan is a budget's: a resumed run given --max-steps alone trains to it.
        self.total = (planned or cap or DEFAULT_STEPS) if budget else cap
        # This process's step times: its first WARMUP_STEPS, then at most the latest
        # 2 x REPLAN_EVERY (what the fit reads), so a long run keeps a bounded list.
        self.step_seconds: list[float] = []
        self.eval_seconds: float | None = None
        self.save_seconds: float | None = None
        # With a validation split the run ends with two evaluations, it and then the held-out
        # data; this is the held-out one's cost against the (timed) validation one's. None:
        # one final evaluation, the held-out data's, as the periodic ones.
        self.held_out_scale: float | None = None
        self.samples = False  # whether the run ends with samples (trainer.samples)
        # The training curves' latest drawing: when (elapsed seconds) and how long it took.
        self.plot_at: float | None = None
        self.plot_seconds = 0.0

    def record(self, seconds: float) -> None:
        """The time of one more step."""
        self.step_seconds.append(seconds)
        if len(self.step_seconds) > WARMUP_STEPS + 3 * REPLAN_EVERY:
            del self.step_seconds[WARMUP_STEPS : -2 * REPLAN_EVERY]

    def final_cost(self) -> float:
        """Seconds kept back for the final evaluation, checkpoint, training curves and
        samples."""
        guess = UNMEASURED_FINAL_SHARE * (self.budget or 0.0)
        # Timed, the evaluations are scaled to their size; untimed, each is a guess.
        scale = self.held_out_scale
        if self.eval_seconds:
            jobs = FINAL_MARGIN * self.eval_seconds * (1.0 if scale is None else 1.0 + scale)
        else:
            jobs = guess * (1 if scale is None else 2)
        jobs += FINAL_MARGIN * self.save_seconds if self.save_seconds else guess
        if self.samples:
            jobs += SAMPLES_SHARE * (
                FINAL_MARGIN * self.eval_seconds if self.eval_seconds else guess
            )
        return jobs + FINAL_MARGIN * self.plot_seconds

    def held_out_evaluation(self, relative: float) -> None:
        """A validation split picks the kept weights: the run ends with an evaluation of it
        and one of the held-out data, which costs ``relative`` times as much (by
        ``evaluate.evaluation_work``: 200 held-out summaries after a validation evaluation of
        52 took the 10-minute runs of 448 pairs 8 s past their budget when counted as one)."""
        self.held_out_scale = relative

    def redraw_due(self, elapsed: float) -> bool:
        """Whether a periodic checkpoint redraws the training curves: the first one does (which
        times the drawing), later ones at most every REDRAW_SECONDS, so that frequent
        checkpoints do not spend their time on plots."""
        return self.plot_at is None or elapsed - self.plot_at >= REDRAW_SECONDS

    def plotted(self, elapsed: float, seconds: float) -> None:
        self.plot_at, self.plot_seconds = elapsed, seconds

    def refit_due(self, step: int) -> bool:
        """Whether to (re)fit the plan after ``step``."""
        if not self.budget:
            return False
        measured = len(self.step_seconds) >= min(FIRST_PLAN_AT, 10)
        return step in (EARLY_PLAN_AT, FIRST_PLAN_AT) or (measured and step % REPLAN_EVERY == 0)

    def fit(self, step: int, elapsed: float, eval_every: int, save_every: int) -> int:
        """The most steps whose time, with the evaluations and checkpoints due on the way and
        the final ones, fits what is left of the budget (at least ``step``: none left)."""
        # The speed now: the latest steps, without this process's first few (warm-up).
        steps = self.step_seconds
        measured = steps[WARMUP_STEPS:] if len(steps) > 2 * WARMUP_STEPS else steps
        recent = measured[-REPLAN_EVERY:]
        per_step = sum(recent) / max(len(recent), 1)
        left = self.budget - elapsed - self.final_cost()
        if save_every:  # the training curves redrawn with the checkpoints on the way
            left *= REDRAW_SECONDS / (REDRAW_SECONDS + self.plot_seconds)

        def cost(n: int) -> float:
            """Seconds of ``n`` more steps, with the periodic jobs due at steps ``step`` (this
            one's are still to come) to ``step + n - 1`` (the last step has the final ones)."""
            total = n * per_step
            for every, seconds in (
                (eval_every, self.eval_seconds),
                (save_every, self.save_seconds),
            ):
                if every and seconds and n > 0:
                    total += ((step + n - 1) // every - (step - 1) // every) * seconds
            return total

        if per_step <= 0 or left <= 0:
            return step
        amortized = per_step + sum(
            seconds / every
            for every, seconds in ((eval_every, self.eval_seconds), (save_every, self.save_seconds))
            if every and seconds
        )
        n = max(0, math.floor(left / amortized))  # close; then exact
        while cost(n + 1) <= left:
            n += 1
        while n > 0 and cost(n) > left:
            n -= 1
        total = step + n
        return min(total, self.cap) if self.cap else total

    def out_of_time(self, elapsed: float) -> bool:
        return bool(self.budget) and elapsed + self.final_cost() >= self.budget
