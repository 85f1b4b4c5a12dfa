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

from data.batching import MixtureLoader
from model.transformer import IGNORE_INDEX
from trainer.checkpoint import intact, save_checkpoint
from trainer.config import TrainConfig
from trainer.distributed import Env, agreed, all_reduce_sum, autocast, no_sync
from trainer.errors import TrainingError
from trainer.evaluate import evaluate
from trainer.metrics import (
    ETA_AFTER_STEPS,
    Progress,
    eta_line,
    peak_memory_mb,
    write_summary,
    write_training_curves,
)
from trainer.optim import lr_at
from trainer.setup import Run, prepare


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
    make_loader: Callable[..., MixtureLoader] = MixtureLoader,
) -> Run:
    """Run training as configured; returns the finished run. Raises ``Stopped`` when a signal
    ended it early (checkpoint saved) and ``TrainingError`` for what the user must fix.

    ``clock`` (seconds) times the steps and the budget, and ``make_loader`` builds the data
    loader, for tests that drive a run by a fake clock or watch its batches."""
    run = prepare(cfg, make_loader=make_loader)
    stop = StopSignal()
    try:
        reason = loop(run, stop, clock)
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
        write_training_curves(run.folder)
    if run.env.distributed:
        torch.distributed.barrier()
    return run


class Window:
    """What a log line averages over: the steps since the last one."""

    def __init__(self) -> None:
        self.tokens, self.time, self.data = 0, 0.0, 0.0
        self.real = 0  # tokens that are not padding
        self.losses: dict[str, list[float]] = {}

    def add(self, other: Window) -> None:
        self.tokens += other.tokens
        self.real += other.real
        self.time += other.time
        self.data += other.data


def loop(run: Run, stop: StopSignal, clock: Callable[[], float]) -> str:
    cfg, env, state = run.cfg, run.env, run.state
    total = state.planned_steps or cfg.run.max_steps
    start_step, elapsed_before = state.step, state.elapsed
    progress = Progress(total, start_step, enabled=env.main and cfg.run.progress)
    window, start, reason = Window(), clock(), "done"
    warm = Window()  # every log window but the first: the speed after warm-up
    # The time estimate waits until the speed is known, sooner on a short run.
    eta_at = start_step + min(ETA_AFTER_STEPS, max((total - start_step) // 2, 1))

    def elapsed() -> float:
        return elapsed_before + clock() - start

    while state.step < total:
        t_step = clock()
        batches = [run.loader.next_batch() for _ in range(cfg.optim.grad_accum)]
        window.data += clock() - t_step
        losses, grad_norm, applied = train_step(
            run, batches, lr_at(state.step, total, cfg.optim), window
        )
        if not applied:
            skip_step(run, progress)
        state.step += 1
        state.tokens += sum(int(b["input_ids"].numel()) for _, b in batches) * env.world_size
        for name, value in losses.items():
            window.losses.setdefault(name, []).append(value)
        window.time += clock() - t_step

        if cfg.run.time_budget and state.planned_steps is None and state.step == min(20, total):
            total = plan_steps(run, (clock() - start) / (state.step - start_step))
            progress.set_total(total)
        if env.main and state.step == eta_at and state.step < total:
            seconds = clock() - start
            progress.write(eta_line(state.step - start_step, seconds, state.step, total))
        progress.update(state.step)
        last = state.step == total
        if state.step % cfg.run.log_every == 0 or last:
            log_record(run, progress, window, grad_norm, elapsed())
            if state.step > start_step + cfg.run.log_every:
                warm.add(window)
            window = Window()
        if cfg.run.eval_every and state.step % cfg.run.eval_every == 0 and not last:
            run_evaluation(run, progress)
        if stop.requested(env):
            save(run, elapsed())
            progress.close()
            raise Stopped(
                f"stopped by signal {stop.received} at step {state.step}; checkpoint saved. "
                f"Continue with: python train.py --resume {cfg.run.output_dir}",
                stop.received,
            )
        if cfg.run.save_every and state.step % cfg.run.save_every == 0 and not last:
            save(run, elapsed())
        if cfg.run.time_budget and not last and agreed(elapsed() >= cfg.run.time_budget, env):
            total = state.step
            reason = f"time budget of {cfg.run.time_budget:g}s reached at step {total}"
    progress.close()
    run_evaluation(run, progress)
    if state.step > start_step:
        # (A resumed run with nothing left to train already has this checkpoint; saving it
        # again would replace the latest complete checkpoint in place.)
        save(run, elapsed())
    if env.main:
        write_summary(run.folder, summary(run, warm, total, elapsed()))
    if state.skipped_steps:
        plural = "s" if state.skipped_steps > 1 else ""
        reason += f" ({state.skipped_steps} step{plural} skipped: non-finite loss or gradient)"
    return f"{reason}: {state.step} steps, {state.tokens:,} tokens; run folder {cfg.run.output_dir}"


def train_step(run: Run, batches: list, lr: float, window: Window) -> tuple[dict, float, bool]:
    """One optimizer step over the micro-batches. Returns each objective's mean loss over the
    global batch, the gradient norm, and whether the step was applied: a non-finite loss or
    gradient leaves the weights untouched."""
    env, optim = run.env, run.cfg.optim
    # Normalise by the label tokens of the whole global batch, so N processes x b equal one
    # process x N*b and accumulation equals a bigger batch exactly.
    label_counts = [int((b["labels"] != IGNORE_INDEX).sum()) for _, b in batches]
    # Tokens that are not padding (masked-LM blocks have none: no attention mask).
    real = [
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        for _, b in batches
    ]
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
                out = run.wrapped(**batch)
            loss = out.loss * out.num_label_tokens / global_count * env.world_size
            loss.backward()
        loss_sums.setdefault(name, []).append(out.loss.detach().double() * out.num_label_tokens)
        window.tokens += int(batch["input_ids"].numel()) * env.world_size
        window.real += real[i] * env.world_size
    losses = reduce_losses(loss_sums, label_counts, batches, env)
    clip = optim.clip_grad if optim.clip_grad > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip))
    applied = math.isfinite(grad_norm) and all(math.isfinite(v) for v in losses.values())
    if applied:
        run.optimizer.step()
        run.state.bad_steps = 0
    run.optimizer.zero_grad(set_to_none=True)
    return losses, grad_norm, applied


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


def skip_step(run: Run, progress: Progress) -> None:
    """A step with a non-finite loss or gradient was not applied; too many in a row stop."""
    state, step = run.state, run.state.step + 1
    state.bad_steps += 1
    state.skipped_steps += 1
    if run.env.main:
        progress.write(f"step {step}: non-finite loss or gradient, step skipped")
    if state.bad_steps >= run.cfg.optim.max_bad_steps:
        progress.close()
        raise TrainingError(
            f"stopped at step {step}: {state.bad_steps} consecutive steps with a non-finite loss "
            f"or gradient. {intact(run.checkpointer)} Try a lower --lr (or --clip-grad), or look "
            "for broken data."
        )


def plan_steps(run: Run, seconds_per_step: float) -> int:
    """A time budget fixes the schedule's length once the speed is known (saved, so a resumed
    run keeps the same schedule)."""
    per_step = agreed(seconds_per_step, run.env)
    budget, state = run.cfg.run.time_budget, run.state
    state.planned_steps = max(state.step, min(run.cfg.run.max_steps, int(budget / per_step)))
    return state.planned_steps


def log_record(run: Run, progress: Progress, window: Window, grad_norm: float, elapsed: float):
    state = run.state
    record = {
        "step": state.step,
        "lr": run.optimizer.param_groups[0]["lr"],
        "tokens": state.tokens,
        "tokens_per_s": window.tokens / max(window.time, 1e-9),
        "data_wait": window.data / max(window.time, 1e-9),
        "grad_norm": grad_norm,
        "elapsed": elapsed,
        "skipped_steps": state.skipped_steps,
    }
    for name, values in window.losses.items():
        record[f"loss/{name}"] = float(np.mean(values))
    run.metrics.write(record)
    progress.log(record)


def summary(run: Run, warm: Window, planned: int, elapsed: float) -> dict:
    """The numbers ``summary.json`` holds for this process's part of the run. Model FLOPs are
    the nominal ones of ``MiniTuringConfig.flops_per_token`` at the masked-LM block length.
    ``timed_*``: the steps after warm-up (the first log window) that the speeds are taken over;
    tokens count input positions, padding included, and real tokens those that are not padding."""
    tokens_per_s = warm.tokens / warm.time if warm.time else None
    flops = run.model.config.flops_per_token(run.model.config.length("seq_len"))
    return {
        "steps": run.state.step,
        "planned_steps": planned,
        "tokens": run.state.tokens,
        "elapsed": elapsed,
        "data_seconds": run.data_seconds,
        "tokens_per_s": tokens_per_s,
        "data_wait": warm.data / warm.time if warm.time else None,
        "timed_seconds": warm.time,
        "timed_tokens": warm.tokens,
        "timed_real_tokens": warm.real,
        "padding_share": 1 - warm.real / warm.tokens if warm.tokens else None,
        "flops_per_token": flops,
        "model_flops_per_s": flops * tokens_per_s if tokens_per_s else None,
        "peak_memory_mb": peak_memory_mb(),
        "processes": run.env.world_size,
        "device": str(run.env.device),
        "precision": "bf16" if run.env.dtype else "fp32",
    }


def run_evaluation(run: Run, progress: Progress) -> dict:
    """Held-out metrics, computed by every rank together and logged by rank 0."""
    results = evaluate(
        run.model,
        run.tokenizer,
        run.streams.eval,
        batch_size=run.cfg.optim.batch_size,
        max_batches=run.cfg.run.eval_batches,
        rouge_samples=run.cfg.run.rouge_samples,
        env=run.env,
    )
    if run.env.main:
        run.metrics.write({"step": run.state.step, **{f"eval/{k}": v for k, v in results.items()}})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in results.items())
        progress.write(f"eval @ step {run.state.step}: {shown}")
    return results


def save(run: Run, elapsed: float) -> None:
    """A checkpoint of the run now. Every rank calls it: a sharded model saves collectively."""
    run.state.data = run.loader.state_dict()
    run.state.elapsed = elapsed
    save_checkpoint(run.checkpointer, run.model, run.optimizer, run.state.to_dict(), run.env)
    if run.env.distributed:
        torch.distributed.barrier()
