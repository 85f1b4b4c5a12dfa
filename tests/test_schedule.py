"""The time-budget plan: the whole run fits the budget, the schedule ends with it, and it is
refitted when the speed changes. Driven by a simulated timeline, so nothing waits."""

from __future__ import annotations

import pytest

from trainer.config import OptimConfig
from trainer.evaluate import evaluation_work
from trainer.optim import lr_at
from trainer.schedule import (
    DEFAULT_BUDGET,
    DEFAULT_STEPS,
    FINAL_MARGIN,
    FIRST_PLAN_AT,
    UNMEASURED_FINAL_SHARE,
    Plan,
)


def simulate(
    budget,
    seconds_per_step,
    eval_every=0,
    eval_cost=0.0,
    save_every=0,
    save_cost=0.0,
    final_eval_cost=None,
    plot_costs=(),
    drawn=None,
    samples_cost=None,
    keep_back_samples=True,
    held_out=None,
    plan_held_out=True,
):
    """Run the loop's bookkeeping against a fake timeline; returns (steps, seconds, plans).
    ``final_eval_cost``: the final evaluation's time, when it differs from the periodic ones;
    ``plot_costs``: the training curves' drawings, one after another (the last repeats), and
    ``drawn`` collects the steps they were drawn at; ``samples_cost``: the closing samples'
    time (kept back unless ``keep_back_samples`` is false); ``held_out``: with a validation
    split, the final held-out evaluation's cost relative to a periodic (validation) one, told
    to the plan unless ``plan_held_out`` is false."""
    plan = Plan(budget, None, None)
    if held_out is not None and plan_held_out:
        plan.held_out_evaluation(held_out)
    plan.samples = samples_cost is not None and keep_back_samples
    step, now, plans = 0, 0.0, []
    drawn = [] if drawn is None else drawn

    def draw():
        nonlocal now
        cost = plot_costs[min(len(drawn), len(plot_costs) - 1)]
        now += cost
        drawn.append(step)
        plan.plotted(now, cost)

    while step < plan.total:
        cost = seconds_per_step(step)
        now += cost
        step += 1
        plan.record(cost)
        if plan.refit_due(step):
            plan.total = plan.fit(step, now, eval_every, save_every)
            plans.append((step, plan.total))
        last = step == plan.total
        if eval_every and step % eval_every == 0 and not last:
            now += eval_cost
            plan.eval_seconds = eval_cost
        if save_every and step % save_every == 0 and not last:
            now += save_cost
            plan.save_seconds = save_cost
            if plot_costs and plan.redraw_due(now):
                draw()
        if not last and plan.out_of_time(now):
            plan.total = step
    now += (eval_cost if final_eval_cost is None else final_eval_cost) + save_cost  # the final ones
    if held_out is not None:
        now += held_out * eval_cost
    if plot_costs:
        draw()
    now += samples_cost or 0.0
    return step, now, plans


def test_without_a_budget_the_plan_is_max_steps():
    assert Plan(None, 77, None).total == 77
    assert not Plan(None, 77, None).refit_due(FIRST_PLAN_AT)
    assert Plan(100.0, 77, 50).total == 50  # a resumed run keeps its saved plan
    # ... unless it is given --max-steps alone: then it trains to that.
    assert Plan(None, 4000, 350).total == 4000


def test_with_neither_flag_a_run_is_the_default_steps_or_the_default_budget():
    plan = Plan(None, None, None)
    assert (plan.total, plan.cap, plan.budget) == (DEFAULT_STEPS, DEFAULT_STEPS, DEFAULT_BUDGET)
    assert plan.refit_due(FIRST_PLAN_AT)
    # Fast steps: the default step count ends it, well inside the budget.
    steps, seconds, _ = simulate(None, lambda s: 0.2, eval_every=400, eval_cost=8.0)
    assert steps == DEFAULT_STEPS and seconds < DEFAULT_BUDGET
    # Slow steps: the budget ends it, with the schedule fitted to the steps that fit.
    steps, seconds, plans = simulate(None, lambda s: 1.3, eval_every=400, eval_cost=8.0)
    assert 300 < steps < DEFAULT_STEPS and seconds <= DEFAULT_BUDGET
    assert plans[-1][1] == steps


def test_the_whole_run_fits_the_budget_and_uses_it():
    steps, seconds, _ = simulate(
        600.0, lambda s: 0.2, eval_every=400, eval_cost=8.0, save_every=400, save_cost=2.0
    )
    assert seconds <= 600.0
    # Nearly all of it: at most a few steps' worth and the unmeasured guesses left over.
    assert seconds >= 600.0 - 0.03 * 600 * 2 - 1.0
    assert 2500 < steps < 3000


def test_a_final_evaluation_longer_than_the_periodic_ones_still_ends_in_time():
    # Its summaries can run longer than the last periodic evaluation's: a fifth longer here.
    steps, seconds, _ = simulate(
        600.0,
        lambda s: 0.2,
        eval_every=400,
        eval_cost=10.0,
        save_every=400,
        save_cost=2.0,
        final_eval_cost=12.0,
    )
    assert steps > 2500 and seconds <= 600.0


def test_a_held_out_evaluation_larger_than_the_validation_one_is_kept_back_at_its_size():
    # 52 validation pairs, 200 held-out ones: the final held-out evaluation costs ~3.8 periodic
    # ones. Counted as one, a 10-minute run ended 8 s late; scaled by its work, it ends in time.
    timeline = dict(eval_every=100, eval_cost=4.0, save_every=400, save_cost=1.0)
    steps, seconds, _ = simulate(600.0, lambda s: 0.7, **timeline, held_out=200 / 52)
    assert 600.0 - 8.0 < seconds <= 600.0  # the margin: a quarter of the final jobs
    _, over, _ = simulate(600.0, lambda s: 0.7, **timeline, held_out=200 / 52, plan_held_out=False)
    assert over > 600.0
    # A smaller held-out split keeps less back than a second validation evaluation would.
    # Untimed (no periodic evaluation yet), each final job is the same guess, whatever its size.
    plan = Plan(600.0, None, None)
    plan.held_out_evaluation(200 / 52)
    assert plan.final_cost() == pytest.approx(3 * UNMEASURED_FINAL_SHARE * 600.0)
    plan = Plan(600.0, None, None)
    plan.eval_seconds, plan.save_seconds = 10.0, 1.0
    plan.held_out_evaluation(127 / 200)
    assert plan.final_cost() == pytest.approx(FINAL_MARGIN * (10.0 * (1 + 127 / 200) + 1.0))


def test_the_closing_samples_are_kept_back():
    # Final jobs exactly a quarter longer than the periodic ones (all the margin they have), then
    # the samples (a twentieth of an evaluation): they fit only because they are kept back.
    timeline = dict(eval_every=400, eval_cost=20.0, save_every=400, save_cost=2.0)
    final = dict(final_eval_cost=25.0, samples_cost=1.0)
    steps, seconds, _ = simulate(600.0, lambda s: 0.2, **timeline, **final)
    assert 600.0 - 1.0 < seconds <= 600.0
    _, over, _ = simulate(600.0, lambda s: 0.2, **timeline, **final, keep_back_samples=False)
    assert over > 600.0


def test_a_slowdown_is_refitted_and_the_run_still_ends_in_time():
    speed = lambda s: 0.1 if s < 500 else 0.3  # noqa: E731
    steps, seconds, plans = simulate(300.0, speed, eval_every=200, eval_cost=3.0)
    assert seconds <= 300.0
    assert plans[0][1] > plans[-1][1]  # planned long at first, then shortened
    assert steps == plans[-1][1]  # and the schedule still ends with the run


def test_the_training_curves_are_redrawn_rarely_and_kept_back_for_the_end():
    # Checkpoints every 5 s; the first drawing imports matplotlib (5 s), later ones take 0.5 s.
    drawn = []
    steps, seconds, _ = simulate(
        300.0, lambda s: 0.1, eval_every=100, eval_cost=1.0, save_every=50, save_cost=0.3,
        plot_costs=(5.0, 0.5), drawn=drawn,
    )  # fmt: skip
    assert 300.0 - 1.0 < seconds <= 300.0
    # Drawn at the first checkpoint, then about once a minute, and at the end.
    assert drawn[0] == 50 and drawn[-1] == steps
    assert 5 <= len(drawn) <= 7


def test_the_learning_rate_ends_with_the_budget():
    cfg = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10)
    steps, _, plans = simulate(100.0, lambda s: 0.05)
    final = plans[-1][1]
    assert steps == final
    assert lr_at(final - 1, final, cfg) == pytest.approx(1e-4, rel=0.02)


def test_the_step_record_stays_bounded_and_keeps_what_the_fit_reads():
    plan = Plan(1000.0, None, None)
    for i in range(5000):
        plan.record(1.0 if i < 4000 else 2.0)
    assert len(plan.step_seconds) <= 3 + 3 * 50
    # The fit reads the latest steps: the speed now (2 s), not the run's mean.
    assert plan.fit(5000, 0.0, 0, 0) == 5000 + int((1000 - 2 * 0.03 * 1000) // 2)


def test_wsd_holds_the_peak_then_decays_over_its_share():
    cfg = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, schedule="wsd", decay_share=0.2)
    rates = [lr_at(step, 100, cfg) for step in range(100)]
    assert rates[9] == rates[10] == rates[80] == pytest.approx(1e-3)  # warmed up, stable
    decay = rates[80:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert rates[99] == pytest.approx(1e-4 + 0.9e-3 * (1 - (19 / 20) ** 0.5))
    assert lr_at(100, 100, cfg) == pytest.approx(1e-4)
    # cosine, for contrast, is already below the peak a quarter of the way in
    assert lr_at(25, 100, OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine")) < 0.95e-3


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_a_refit_that_adds_steps_never_raises_the_rate(
    tmp_path, corpus_files, monkeypatch, schedule
):
    """In a real run: the plan, fitted to 22 steps at step 5, finds time for 40 at step 20, in
    the middle of the decay. The rate holds where it was instead of jumping back up; it was the
    cosine schedule's jump that the default job's curves showed."""
    from conftest import metrics, train_flags

    import train
    from trainer.schedule import Plan

    monkeypatch.setattr(Plan, "fit", lambda self, step, *a: 22 if step < 20 else 40)
    out = tmp_path / "run"
    flags = ["--time-budget", "3600", "--warmup-steps", "2", "--log-every", "1", "--lr", "1e-3"]
    flags += ["--schedule", schedule, "--objectives", "masked_lm=1"]
    train.train(train.config_from_args(train_flags(out, corpus_files, *flags)))
    rates = [m["lr"] for m in metrics(out) if "lr" in m]
    assert len(rates) == 40
    assert rates[18] < 1e-3  # decaying before the refit at step 20
    after_warmup = rates[2:]
    assert all(b <= a for a, b in zip(after_warmup, after_warmup[1:], strict=False)), rates
    # and the decay goes on to the new end
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, schedule=schedule)
    assert rates[-1] == pytest.approx(lr_at(39, 40, cfg)) and rates[-1] < rates[19]


def test_evaluation_work_counts_the_summaries_decoded_else_the_examples_scored():
    val = {"masked_lm": [0] * 1000, "summarize": [0] * 52}
    held_out = {"masked_lm": [0] * 900, "summarize": [0] * 504, "title": [0] * 30}
    assert evaluation_work(val, 32, 8, 200) == 52
    assert evaluation_work(held_out, 32, 8, 200) == 200 + 30  # each task's first 200
    # Without decoding (text alone, or --rouge-samples 0): the examples scored, 8 batches each.
    assert evaluation_work({"masked_lm": [0] * 1000, "gap_summary": [0] * 100}, 32, 8, 200) == 356
    assert evaluation_work(val, 32, 8, 0) == 256 + 52
