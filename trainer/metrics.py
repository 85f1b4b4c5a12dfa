"""What a run tells about itself: metrics.jsonl (and TensorBoard), the time estimate, the
training-curves picture and ``summary.json`` for benchmarks."""

from __future__ import annotations

import contextlib
import json
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from model.files import atomic_write_text
from trainer.errors import TrainingError

SUMMARY_FILE = "summary.json"


class Metrics:
    """metrics.jsonl, appended by the main process; on resume, lines past the checkpoint's
    step (logged before a crash) are dropped so the file matches the resumed run."""

    def __init__(
        self, path: Path, enabled: bool, resume_step: int | None, report_to: str = "none"
    ) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if _logged_by(line, resume_step)]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif enabled and resume_step is None and path.exists():
            # A fresh start in a folder whose earlier attempt never completed a checkpoint:
            # what it logged belongs to no run.
            path.unlink()
        self.tensorboard = (
            TensorBoardWriter(path.parent / "tensorboard", resume_step)
            if enabled and report_to == "tensorboard"
            else None
        )

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _logged_by(line: str, step: int) -> bool:
    """Whether a metrics line belongs to the run up to ``step``; a line torn by a crash does not."""
    try:
        return json.loads(line).get("step", 0) <= step
    except json.JSONDecodeError:
        return False


REPORT_TO = ("none", "tensorboard")


TENSORBOARD_EXTRA = 'pip install -e ".[tensorboard]"'


ETA_AFTER_STEPS = 20


def check_report_to(report_to: str) -> None:
    """Fail before any work when --report-to names an unknown target or a missing package."""
    if report_to not in REPORT_TO:
        raise TrainingError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise TrainingError(
                f"--report-to tensorboard needs the tensorboard package: {TENSORBOARD_EXTRA}"
            ) from None


class TensorBoardWriter:
    """The metrics.jsonl records as TensorBoard scalars in RUN/tensorboard. Keys keep their
    names (loss/masked_lm, eval/summarize/rouge1, ...); lone ones go under train/ (train/lr)."""

    def __init__(self, folder: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events past the checkpoint (logged before a crash) are hidden, as
        # Metrics drops those lines from metrics.jsonl.
        purge_step = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        self.writer.flush()  # records are rare (every --log-every steps); never lose one

    def close(self) -> None:
        self.writer.close()


def write_training_curves(folder: Path, quiet: bool = False) -> None:
    """RUN/training_curves.png from metrics.jsonl. A run never fails for its plot. ``quiet``:
    redrawn with a checkpoint during the run, where a failure waits for the final one to say."""
    from trainer.plot import plot_run

    try:
        path = plot_run(folder)
    except Exception as err:  # matplotlib missing (the message names the extra), or a bad file
        if not quiet:
            print(f"training curves not drawn: {err}; later: minituring plot {folder}")
        return
    if not quiet:
        print(f"training curves: {path}", flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def eta_line(steps_done: int, seconds: float, step: int, total: int) -> str:
    """One line once the speed is known: time per step and the time left to ``total``."""
    per_step = seconds / max(steps_done, 1)
    return (
        f"speed: {per_step:.3g} s/step over {steps_done} steps; about "
        f"{_duration(per_step * (total - step))} to finish {total:,} steps "
        "(evaluations and checkpoints not included)"
    )


class Progress:
    """On a terminal, a progress bar; elsewhere (a log file, a scheduler) one plain line per log
    interval instead of carriage-return refreshes."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(
            total=total, initial=initial, disable=not self.tty, dynamic_ncols=True, unit="step"
        )

    def set_total(self, total: int) -> None:
        self.total = self.bar.total = total
        self.bar.refresh()

    def update(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def log(self, record: dict) -> None:
        losses = {k.split("/")[1]: v for k, v in record.items() if k.startswith("loss/")}
        if self.tty:
            shown = {k[:4]: f"{v:.3f}" for k, v in losses.items()}
            self.bar.set_postfix(**shown, tok_s=f"{record['tokens_per_s']:.0f}")
        elif self.enabled:
            shown = " ".join(f"{k}={v:.3f}" for k, v in losses.items())
            print(
                f"step {record['step']}/{self.total} | loss {shown} | "
                f"{record['tokens_per_s']:.0f} tokens/s | {_duration(record['elapsed'])}",
                flush=True,
            )

    def write(self, line: str) -> None:
        tqdm.write(line)

    def close(self) -> None:
        self.bar.close()


def peak_memory_mb() -> float:
    """Peak memory of this process: the GPU's allocations on CUDA, else the resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM is this process image's own peak; ru_maxrss carries the parent's over exec, so a
    # run started by a bigger process would report at least that process's peak.
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_summary(folder: Path, summary: dict) -> None:
    """RUN/summary.json: what a benchmark reads of a finished run (speed after warm-up, data
    wait, peak memory, model FLOP/s, planned and actual length), instead of parsing logs."""
    atomic_write_text(folder / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
