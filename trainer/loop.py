"""The training loop: ``train(cfg)`` prepares a run, then steps until the plan is done, with the
side jobs (logging, evaluation, checkpoints, the time budget, signals) behind small helpers."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from data.batching import MixtureLoader, pieces_for, split_batch
from model.constants import IGNORE_INDEX
from model.generate import DecodingConfig
from trainer.checkpoint import intact_checkpoint_note, kept_model, save_checkpoint
from trainer.config import OptimConfig, TrainConfig
from trainer.distributed import Env, all_reduce_sum, autocast, no_sync, rank0_value
from trainer.errors import TrainingError
from trainer.evaluate import Evaluation, evaluate, evaluation_work
from trainer.keep import keep_at_end, keep_if_best, kept_summary, selection
from trainer.metrics import (
    ETA_AFTER_STEPS,
    Progress,
    eta_line,
    peak_memory_mb,
    write_summary,
    write_training_curves,
)
from trainer.optim import final_decay_lr, lr_at, warmup_steps
from trainer.patience import (
    after_evaluation,
    announcement,
    begin_final_decay,
    check_validation,
    ran_out,
    stopped_line,
    stopped_summary,
)
from trainer.prepare import Run, TrainState, prepare, release_freed_memory
from trainer.samples import write_samples
from trainer.schedule import Plan


class StopSignal:
    """SIGTERM / SIGINT (pre-emption, Ctrl-C): finish the step, checkpoint, exit with status
    128 + the signal's number, what a shell reports for a process the signal ended, so that
    schedulers and scripts see the run as not finished. A second signal stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum

    def requested(self, env: Env) -> bool:
        """Whether to stop now. Every process must stop at the same step while a signal may
        reach them at different moments, so with several they agree on it."""
        if not env.distributed:
            return self.received is not None
        signum = torch.tensor([self.received or 0], device=env.device)
        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
        if int(signum) and self.received is None:
            self.received = int(signum)
        return bool(int(signum))

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Stopped(Exception):
    """The loop stopped for a signal, after saving a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def train(
    cfg: TrainConfig,
    *,
    clock: Callable[[], float] = time.perf_counter,
    make_loader: Callable[..., MixtureLoader] | None = None,
    startup: float = 0.0,
    samples: bool = False,
) -> Run:
    """Run training as configured; returns the finished run. Raises ``Stopped`` when a signal
    ended it early (checkpoint saved) and ``TrainingError`` for what the user must fix.

    ``startup`` is the seconds this process spent before the call (the interpreter and its
    imports: the command's), counted in the time budget. ``clock`` (seconds) times the steps
    and the budget, and ``make_loader`` builds the data loader (by default the one the
    configuration asks for), for tests that drive a run by a fake clock or watch its batches.
    ``samples``: the run ends with ``trainer.samples`` (``run.samples``), inside its budget."""
    started = clock()
    with contextlib.ExitStack() as cleanup:  # the folder's lock and more, until the run ends
        run = prepare(cfg, cleanup, make_loader=make_loader)
        run.state.elapsed += startup  # the run's seconds before this process's clock
        stop = StopSignal()
        try:
            reason = loop(run, stop, clock, started, samples)
        except Stopped as stopped:
            # Pre-empted: the grace period is short, so no plot or samples.
            if run.env.main:
                print(stopped, flush=True)
                run.metrics.close()
            raise
        finally:
            stop.restore()
        if run.env.main:
            print(reason, flush=True)
            run.metrics.close()
        if run.env.distributed:
            torch.distributed.barrier()
    return run


class LogWindow:
    """What a log line averages over: the steps since the last one (all ranks' tokens)."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.data_wait = 0, 0.0, 0.0
        self.real_tokens = 0  # tokens that are not padding
        self.losses: dict[str, list[float]] = {}

    def add(self, other: LogWindow) -> None:
        self.tokens += other.tokens
        self.real_tokens += other.real_tokens
        self.seconds += other.seconds
        self.data_wait += other.data_wait


class StepTracker:
    """What the loop records of each step, and shows: the run's elapsed time, the log windows
    (tokens, seconds, losses), the progress bar and the one-off time estimate."""

    def __init__(self, run: Run, plan: Plan, clock: Callable[[], float], started: float) -> None:
        self.run, self.plan, self.clock, self.started = run, plan, clock, started
        self.start_step, self.elapsed_before = run.state.step, run.state.elapsed
        enabled = run.env.main and run.cfg.run.progress
        self.progress = Progress(plan.total, self.start_step, enabled=enabled)
        self.window = LogWindow()
        self.after_warmup = LogWindow()  # every log window but the first, summed
        self.samples_seconds: float | None = None  # the closing samples, when made
        self.first_step: float | None = None  # seconds from train() to this process's first step
        self.window.losses = run.state.window_losses
        # The time estimate waits until the speed is known, sooner on a short run.
        self.eta_at = self.start_step + min(
            ETA_AFTER_STEPS, max((plan.total - self.start_step) // 2, 1)
        )

    def elapsed(self) -> float:
        return self.elapsed_before + self.clock() - self.started

    def timed(self, job, *args) -> float:
        """Run ``job``; its duration, the same on every rank."""
        t = self.clock()
        job(*args)
        return rank0_value(self.clock() - t, self.run.env)

    def step_done(self, batches: list, losses: dict, data_wait: float, seconds: float) -> None:
        state, world = self.run.state, self.run.env.world_size
        state.step += 1
        if self.first_step is None:
            self.first_step = self.clock() - self.started
        state.tokens += sum(int(b["input_ids"].numel()) for _, b in batches) * world
        for name, value in losses.items():
            self.window.losses.setdefault(name, []).append(value)
        self.window.tokens += sum(int(b["input_ids"].numel()) for _, b in batches) * world
        # Tokens that are not padding (masked-LM blocks have none: no attention mask).
        self.window.real_tokens += world * sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            for _, b in batches
        )
        self.window.data_wait += data_wait
        self.window.seconds += seconds
        self.plan.record(seconds)
        step, total = state.step, self.plan.total
        if self.run.env.main and step == self.eta_at and step < total:
            seconds = sum(self.plan.step_seconds)
            self.progress.write(eta_line(step - self.start_step, seconds, step, total))
        self.progress.update(step)

    def maybe_log(self, grad_norm: float, last: bool) -> None:
        step = self.run.state.step
        if step % self.run.cfg.run.log_every == 0 or last:
            log_record(self.run, self.progress, self.window, grad_norm, self.elapsed())
            if step > self.start_step + self.run.cfg.run.log_every:
                self.after_warmup.add(self.window)
            self.window = LogWindow()


# Steps between handing freed memory back to the system. The allocator keeps what each step
# frees, and steps of other shapes grow its heap: 150 steps of the default job peaked at 1.50 and
# 1.52 GB with this, 1.75 and 1.72 GB without, at the same speed (docs/performance.md). After
# every step, each next step would pay its page faults again.
RELEASE_EVERY = 50


def loop(
    run: Run, stop: StopSignal, clock: Callable[[], float], started: float, samples: bool = False
) -> str:
    """Train to the end of the plan; ``started`` is the clock when this process began the run,
    ``samples`` whether it ends with samples."""
    cfg, env, state = run.cfg, run.env, run.state
    plan = Plan(cfg.run.time_budget, cfg.run.max_steps, state.planned_steps)
    if state.stopping:  # resumed in the final decay of --patience: it ends where decided
        plan.total = plan.cap = min(plan.total, state.stopping["end"])
    check_validation(run, selection(run))
    if selection(run):
        plan.held_out_evaluation(held_out_relative_cost(run))
    plan.samples = samples
    tracker, reason = StepTracker(run, plan, clock, started), "done"
    while state.step < plan.total:
        t = clock()
        batches = [run.loader.next_batch() for _ in range(cfg.optim.grad_accum)]
        data_wait = clock() - t
        losses, grad_norm = train_step(run, batches, learning_rate(state, plan, cfg.optim))
        tracker.step_done(batches, losses, data_wait, clock() - t)
        if plan.refit_due(state.step):
            fitted = plan.fit(state.step, tracker.elapsed(), cfg.run.eval_every, cfg.run.save_every)
            state.planned_steps = plan.total = int(rank0_value(fitted, env))
            tracker.progress.set_total(plan.total)
        last = state.step == plan.total
        tracker.maybe_log(grad_norm, last)
        if state.step % RELEASE_EVERY == 0:
            release_freed_memory()
        if periodic_job_due(state.step, cfg.run.eval_every, last):
            plan.eval_seconds = tracker.timed(periodic_evaluation, run, tracker.progress)
            release_freed_memory()  # what decoding's beams and caches held
            if ran_out(run):
                stop_early(run, plan, tracker)
        if stop.requested(env):
            save_run(run, tracker)
            tracker.progress.close()
            raise Stopped(
                f"stopped by signal {stop.received} at step {state.step}; checkpoint saved. "
                f"Continue with: python train.py --resume {cfg.run.output_dir}",
                stop.received,
            )
        if periodic_job_due(state.step, cfg.run.save_every, last):
            plan.save_seconds = tracker.timed(save_run, run, tracker)
            draw_curves(run, tracker)
        if not last and rank0_value(plan.out_of_time(tracker.elapsed()), env):
            state.planned_steps = plan.total = state.step
            reason = f"time budget of {plan.budget:g}s reached at step {state.step}"
            if state.step % cfg.run.log_every:  # the steps since the last log line
                tracker.maybe_log(grad_norm, last=True)
    if state.stopping and reason == "done":
        reason = stopped_line(state)
    return finish(run, tracker, reason)


def learning_rate(state: TrainState, plan: Plan, optim: OptimConfig) -> float:
    """This step's rate: the schedule over the plan, never raised again after the warm-up
    (``optim.lr_at``), or, once --patience ran out, the final decay to the floor."""
    if state.stopping:
        begun = state.stopping
        lr = final_decay_lr(state.step, begun["step"], plan.total, begun["lr"], optim)
        state.lr_ceiling = lr
        return lr
    lr = lr_at(state.step, plan.total, optim, state.lr_ceiling)
    if state.step >= warmup_steps(plan.total, optim):
        state.lr_ceiling = lr
    return lr


def stop_early(run: Run, plan: Plan, tracker: StepTracker) -> None:
    """--patience ran out: the run now ends after a short decay (``patience``), and no refit
    of the time budget's plan may lengthen it again."""
    end = begin_final_decay(run, plan.total)
    run.state.planned_steps = plan.total = plan.cap = end
    tracker.progress.set_total(end)
    if run.env.main:
        tracker.progress.write(announcement(run.state, run.state.kept))


def periodic_job_due(step: int, every: int, last: bool) -> bool:
    """Whether a periodic job (every ``every`` steps, 0: never) runs after ``step``; the last
    step has the final evaluation and checkpoint instead."""
    return bool(every) and step % every == 0 and not last


def finish(run: Run, tracker: StepTracker, reason: str) -> str:
    """The final evaluation and checkpoint, summary.json, and the closing line."""
    state = run.state
    tracker.progress.close()
    if state.step > tracker.start_step:
        # (A resumed run with nothing left to train already has these evaluations, logged just
        # before this checkpoint; saving it again would replace the latest complete checkpoint
        # in place.)
        rule = selection(run)
        if rule:
            keep_at_end(run, run_evaluation(run, tracker.progress, "val"), rule)
        evaluate_kept(run, tracker.progress)
        save_run(run, tracker)
        draw_curves(run, tracker, final=True)
    if run.env.main and tracker.plan.samples:
        started = tracker.clock()
        raw = run.data.raw
        tasks = {name: raw.pairs(name, "eval") for name in raw.tasks}
        run.samples = write_samples(run.folder, raw.eval_pairs, tasks)
        tracker.samples_seconds = tracker.clock() - started
    if run.env.main:
        write_summary(run.folder, summary(run, tracker))
    if tracker.plan.budget:
        reason += f" ({tracker.elapsed():.0f}s of the {tracker.plan.budget:g}s budget)"
    if state.skipped_steps:
        plural = "s" if state.skipped_steps > 1 else ""
        reason += f" ({state.skipped_steps} step{plural} skipped: non-finite loss or gradient)"
    return f"{reason}: {state.step} steps, {state.tokens:,} tokens; run folder {run.cfg.run.output_dir}"


def train_step(run: Run, batches: list, lr: float) -> tuple[dict, float]:
    """One optimizer step over the micro-batches. Returns each objective's mean loss over the
    global batch and the gradient norm; a non-finite loss or gradient leaves the weights
    untouched (``skip_step``)."""
    env, optim = run.env, run.cfg.optim
    batches = split_batches(run, batches)
    # Normalise by the label tokens of the whole global batch, so N processes x b equal one
    # process x N*b and accumulation equals a bigger batch exactly.
    label_counts = [int((b["labels"] != IGNORE_INDEX).sum()) for _, b in batches]
    global_count = all_reduce_sum(torch.tensor(float(sum(label_counts))).to(env.device), env)
    global_count = global_count.clamp(min=1)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sums: dict[str, list[torch.Tensor]] = {}
    for i, (name, batch) in enumerate(batches):
        batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
        # Gradients are synchronised on the last micro-batch only.
        last = i == len(batches) - 1 or not env.distributed
        with contextlib.nullcontext() if last else no_sync(run.wrapped):
            with autocast(env):
                smoothing = optim.label_smoothing if name != "masked_lm" else 0.0
                out = run.wrapped(**batch, label_smoothing=smoothing)
            loss = out.loss * out.num_label_tokens / global_count * env.world_size
            loss.backward()
        loss_sums.setdefault(name, []).append(out.loss.detach().double() * out.num_label_tokens)
    losses = reduce_losses(loss_sums, label_counts, batches, env)
    clip = optim.clip_grad if optim.clip_grad > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip))
    if math.isfinite(grad_norm) and all(math.isfinite(v) for v in losses.values()):
        run.optimizer.step()
        run.state.bad_steps = 0
    else:
        skip_step(run)
    run.optimizer.zero_grad(set_to_none=True)
    return losses, grad_norm


def split_batches(run: Run, batches: list) -> list:
    """The micro-batches as pieces of at most --max-batch-tokens positions. Every rank runs as
    many pieces as the rank that needs most, so collectives (FSDP's gathers, DDP's last-piece
    sync) pair up."""
    limit = run.cfg.optim.max_batch_tokens
    if limit is None:
        limit = run.cfg.optim.batch_size * run.model.config.seq_len
    counts = torch.tensor([pieces_for(b, limit) for _, b in batches], device=run.env.device)
    if run.env.distributed:
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
    return [
        (name, piece)
        for (name, batch), n in zip(batches, counts.tolist(), strict=True)
        for piece in split_batch(batch, int(n))
    ]


def reduce_losses(
    sums: dict[str, list[torch.Tensor]], label_counts: list[int], batches, env: Env
) -> dict[str, float]:
    """Per objective, the step's mean loss over the label tokens of the whole global batch
    (all micro-batches, all ranks), so what rank 0 logs is what one process with the global
    batch would log. ``sums`` holds loss x label tokens per micro-batch, in float64 so a lone
    micro-batch gives back its own mean exactly."""
    names = list(sums)
    counts = dict.fromkeys(names, 0)
    for (name, _), count in zip(batches, label_counts, strict=True):
        counts[name] += count
    totals = torch.stack(
        [torch.stack(sums[n]).sum() for n in names]
        + [torch.tensor(float(counts[n]), dtype=torch.float64, device=env.device) for n in names]
    )
    totals = all_reduce_sum(totals, env).cpu()
    k = len(names)
    return {n: float(totals[i] / totals[k + i].clamp(min=1)) for i, n in enumerate(names)}


def skip_step(run: Run) -> None:
    """A step with a non-finite loss or gradient is not applied; too many in a row stop."""
    state, step = run.state, run.state.step + 1
    state.bad_steps += 1
    state.skipped_steps += 1
    if run.env.main:
        tqdm.write(f"step {step}: non-finite loss or gradient, step skipped")
    if state.bad_steps >= run.cfg.optim.max_bad_steps:
        note = intact_checkpoint_note(run.checkpointer)
        raise TrainingError(
            f"stopped at step {step}: {state.bad_steps} consecutive steps with a non-finite loss "
            f"or gradient. {note} Try a lower --lr (or --clip-grad), or look for broken data."
        )


def log_record(run: Run, progress: Progress, window: LogWindow, grad_norm: float, elapsed: float):
    state = run.state
    record = {
        "step": state.step,
        "lr": run.optimizer.param_groups[0]["lr"],
        "tokens": state.tokens,
        "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
        "data_wait": window.data_wait / max(window.seconds, 1e-9),
        "grad_norm": grad_norm,
        "elapsed": elapsed,
        "skipped_steps": state.skipped_steps,
    }
    for name, values in window.losses.items():
        record[f"loss/{name}"] = float(np.mean(values))
    run.metrics.write(record)
    progress.log(record)


def summary(run: Run, tracker: StepTracker) -> dict:
    """The numbers ``summary.json`` holds for this process's part of the run. Model FLOPs are
    the nominal ones of ``MiniTuringConfig.flops_per_token`` at the masked-LM block length.
    ``timed_*``: the steps after warm-up (the first log window) that the speeds are taken over;
    tokens count input positions, padding included, and real tokens those that are not padding.
    ``first_step_seconds``: from the start of training (after imports) to this process's first
    finished step, preparation included."""
    warm, plan = tracker.after_warmup, tracker.plan
    tokens_per_s = warm.tokens / warm.seconds if warm.seconds else None
    flops = run.model.config.flops_per_token(run.model.config.length("seq_len"))
    return {
        "steps": run.state.step,
        "planned_steps": plan.total,
        "time_budget": plan.budget,
        "tokens": run.state.tokens,
        "elapsed": tracker.elapsed(),
        "data_seconds": run.data.seconds,
        "first_step_seconds": tracker.first_step,
        "tokens_per_s": tokens_per_s,
        "data_wait": warm.data_wait / warm.seconds if warm.seconds else None,
        "timed_seconds": warm.seconds,
        "timed_tokens": warm.tokens,
        "timed_real_tokens": warm.real_tokens,
        "padding_share": 1 - warm.real_tokens / warm.tokens if warm.tokens else None,
        "flops_per_token": flops,
        "model_flops_per_s": flops * tokens_per_s if tokens_per_s else None,
        "peak_memory_mb": peak_memory_mb(),
        "processes": run.env.world_size,
        "device": str(run.env.device),
        "precision": "bf16" if run.env.dtype else "fp32",
        "optimizer": run.cfg.optim.optimizer,
        "init_from": getattr(run.model.config, "init_from", None),  # the parent run, if any
        "kept": kept_summary(run),
        "samples_seconds": tracker.samples_seconds,
        "stopped": stopped_summary(run.state),  # None unless --patience ended the run early
    }


def periodic_evaluation(run: Run, progress: Progress) -> None:
    """The validation split, whose best evaluation's weights are kept; without one, the
    held-out data (and the last weights are kept)."""
    rule = selection(run)
    if rule is None:
        run_evaluation(run, progress, "eval")
        return
    improved = keep_if_best(run, run_evaluation(run, progress, "val"), rule)
    if run.cfg.run.patience:
        after_evaluation(run.state, improved)


def evaluate_kept(run: Run, progress: Progress) -> None:
    """The final evaluation of the held-out data, with the kept weights."""
    kept = run.state.kept
    if kept is None or kept["step"] == run.state.step:
        run_evaluation(run, progress, "eval")
        return
    if run.env.distributed:
        torch.distributed.barrier()  # rank 0 has written them
    run_evaluation(run, progress, "eval", kept_model(run.checkpointer, run.model, run.env.device))


def held_out_relative_cost(run: Run) -> float:
    """What the final evaluation of the held-out data costs against one of the validation
    split (``evaluate.evaluation_work``)."""
    streams, c = run.data.streams, run.cfg

    def work(split: str) -> int:
        return evaluation_work(getattr(streams, split), c.optim.batch_size, c.run.eval_batches,
                               c.run.rouge_samples)  # fmt: skip

    return work("eval") / max(work("val"), 1)


def run_evaluation(
    run: Run, progress: Progress, split: str = "eval", model: torch.nn.Module | None = None
) -> Evaluation:
    """The metrics of ``split`` ("eval": the held-out data, "val": the validation split), of
    ``model`` (default: the run's), computed by every rank together and logged by rank 0 under
    ``split/``."""
    results = evaluate(
        model or run.model,
        run.data.tokenizer,
        getattr(run.data.streams, split),
        batch_size=run.cfg.optim.batch_size,
        max_batches=run.cfg.run.eval_batches,
        rouge_samples=run.cfg.run.rouge_samples,
        decoding=decodings(run),  # as summarize and generate(task=...) decode
        env=run.env,
    )
    if run.env.main:
        record = {f"{split}/{k}": v for k, v in results.items()}
        run.metrics.write({"step": run.state.step, **record})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items())
        progress.write(f"{split} @ step {run.state.step}: {shown}")
    return results


def decodings(run: Run) -> DecodingConfig | dict[str, DecodingConfig]:
    """How the evaluation decodes: as ``summarize`` does, and each named task as
    ``generate(task=...)`` does (its own generation_config.json entry)."""
    summarize = DecodingConfig(**run.generation)
    if not run.task_generation:
        return summarize
    named = {name: DecodingConfig(**options) for name, options in run.task_generation.items()}
    return {"summarize": summarize, **named}


def draw_curves(run: Run, tracker: StepTracker, final: bool = False) -> None:
    """RUN/training_curves.png up to the checkpoint just saved, drawn by the main process: at the
    end, and during the run at its first checkpoint and then at most every
    ``schedule.REDRAW_SECONDS``. Its time (seconds: the first one imports matplotlib) is kept back
    with the final checkpoint's."""
    plan = tracker.plan
    if not run.env.main or not (final or plan.redraw_due(tracker.elapsed())):
        return
    t = tracker.clock()
    write_training_curves(run.folder, quiet=not final)
    plan.plotted(tracker.elapsed(), tracker.clock() - t)


def save_run(run: Run, tracker: StepTracker) -> None:
    """The whole run now, as a checkpoint: weights and optimizer, with the loop's state (the
    loader's position, the clock, the open log window's losses). Every rank calls it: a
    sharded model saves collectively."""
    run.state.data = run.loader.state_dict()
    run.state.elapsed = tracker.elapsed()
    run.state.window_losses = tracker.window.losses
    # The checkpoint's weights are the kept ones unless an evaluation chose others.
    export = selection(run) is None or run.state.kept is None
    state = run.state.to_dict()
    save_checkpoint(run.checkpointer, run.model, run.optimizer, state, run.env, export)
    if run.env.distributed:
        torch.distributed.barrier()
