"""What the benchmarks share: running ``train.py`` as a user runs it and reading what it wrote,
and a plain-text table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Failed(RuntimeError):
    """A child process that did not succeed: why (``why``), and where its log is."""

    def __init__(self, why: str, log: Path) -> None:
        super().__init__(f"{why}; see {log}")
        self.why = why


def run(command: list[str], log: Path, *, timeout=None, env=None, echo=None) -> dict:
    """``command`` in a process of its own, from the repository root, its output in ``log``
    (and printed, each line after ``echo``); the seconds it took and its own peak resident
    memory (``os.wait4``: that child alone). Raises Failed, the log's tail printed, if it fails."""
    start, timed_out = time.perf_counter(), []
    with open(log, "w") as out:
        child = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})},
                                 stdout=subprocess.PIPE if echo else out,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
        timer = threading.Timer(timeout or 0, lambda: (timed_out.append(1), child.kill()))
        if timeout:
            timer.start()
        for line in child.stdout or ():
            out.write(line)
            print(f"{echo} | {line.rstrip()}", flush=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        timer.cancel()
    if child.returncode:
        why = f"timed out after {timeout:.0f}s" if timed_out else f"exit status {child.returncode}"
        tail = log.read_text(errors="replace").strip().splitlines()[-20:]
        print(f" FAILED ({why}); {log}:\n" + "\n".join("      " + x for x in tail), flush=True)
        raise Failed(why, log)
    return {"wall_s": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024}


def run_train(flags: list[str], out: Path, **kwargs) -> dict:
    """``python train.py FLAGS --output-dir OUT`` in a fresh folder, logged to ``OUT.log``
    (``run``'s keywords); its summary.json, with the process's ``wall_s``, ``peak_rss_mib``
    and ``command``."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "train.py", *flags, "--output-dir", str(out)]
    measured = run(command, out.parent / f"{out.name}.log", **kwargs)
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, **measured, "command": command[1:]}


def table(rows: list[tuple[str, ...]], rule: bool = False) -> str:
    """Columns padded to their widest cell, two spaces apart; a dashed rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [*rows[:1], *([tuple("-" * w for w in widths)] if rule else []), *rows[1:]]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
                     for x in lines)  # fmt: skip
