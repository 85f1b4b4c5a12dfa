"""One training process with hooks at the moments a kill can land on: ``train.main`` with the
functions it calls wrapped from outside (the trainer has no test-only code). ``bench.soak``
runs it to know where each kill landed; the fault tests run it to freeze at an exact moment.

    python -m bench.faults [train.py flags...]

Moments: ``data``, ``step``, ``eval``, ``save`` and its parts (``SAVE_PHASES``), ``final``.
Set by the environment:

``MINITURING_FAULT=POINT:N``   freeze the N-th time POINT of ``POINTS`` is reached (a checkpoint's
                               weights or optimizer half written, before its rename, before the
                               ``latest`` pointer, the exported weights half written), create
                               the file ``MINITURING_FAULT_READY`` names, and sleep.
``MINITURING_SLOW_STEPS=S``    every training step lasts at least S seconds.
``MINITURING_PID_DIR=FOLDER``  each rank writes ``rank-R.pid`` there.
``SOAK_PHASE=FILE``, ``SOAK_LOG=FILE``  rank 0 writes the moment it is in there (one word,
                               overwritten), and appends ``{"phase", "t"}`` lines at each change.
``SOAK_PAUSE=PHASE:SECONDS``   rank 0 sleeps that long on first reaching PHASE, before it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

POINTS = ("weights", "optimizer", "rename", "pointer", "export")
SAVE_PHASES = tuple(f"save:{part}" for part in ("weights", "optimizer", "rng", "state", "rename",
                                                "pointer", "export", "prune"))  # fmt: skip
_HANDLERS: list = []  # each called as handler(moment, "before" | "after", path)


def _wrap(owner, name: str, moment) -> None:
    """``owner.name`` calls the handlers before and after itself, with ``moment(*args)`` (a
    moment and a path, or None). A renamed hook point fails here, loudly."""
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        try:
            point, path = moment(*args, **kwargs) or (None, None)
        except TypeError:  # an argument that is no path (a buffer, a descriptor)
            point = path = None
        for handler in _HANDLERS if point else ():
            handler(point, "before", path)
        result = real(*args, **kwargs)
        for handler in _HANDLERS if point else ():
            handler(point, "after", path)
        return result

    setattr(owner, name, wrapped)


def on_moments(handler) -> None:
    """Call ``handler(moment, "before" | "after", path)`` around each moment of training."""
    if not _HANDLERS:
        import torch

        from trainer import checkpoint, loop, prepare

        def named(table):
            return lambda obj, f, *a, **k: (table.get(Path(f).name), f)

        in_tmp = lambda path: Path(path).parent.name.startswith(".step-")  # noqa: E731
        _wrap(prepare, "load_raw", lambda *a, **k: ("data", None))
        _wrap(loop, "lr_at", lambda *a, **k: ("step", None))  # once at the start of each step
        _wrap(loop, "run_evaluation", lambda *a, **k: ("eval", None))
        _wrap(loop, "save_checkpoint", lambda *a, **k: ("save", None))
        _wrap(checkpoint, "save_file",
              lambda t, f, **k: ("save:weights" if in_tmp(f) else "save:export", f))  # fmt: skip
        _wrap(checkpoint.Checkpointer, "_prune", lambda *a, **k: ("save:prune", None))
        _wrap(loop, "write_training_curves",
              lambda folder, quiet=False: None if quiet else ("final", None))  # fmt: skip
        _wrap(torch, "save", named({"optimizer.pt": "save:optimizer", "rng.pt": "save:rng"}))
        _wrap(checkpoint, "atomic_write_text",
              lambda path, text: named({"state.json": "save:state", "latest": "save:pointer"})(
                  None, path))  # fmt: skip
        _wrap(os, "replace", lambda src, dst, *a, **k: (
            ("save:rename", src) if Path(src).name.startswith(".step-") else None))  # fmt: skip
    _HANDLERS.append(handler)


def freeze(point: str, n: int, ready: Path) -> None:
    """The n-th arrival at ``point`` (of POINTS) freezes the process: a file half written
    after its write, a rename or pointer before it."""
    if point not in POINTS:
        raise SystemExit(f"bench.faults: unknown point {point!r}; expected one of {POINTS}")
    when, seen = "before" if point in ("rename", "pointer") else "after", [0]

    def handler(moment: str, now: str, path) -> None:
        seen[0] += (moment, now) == (f"save:{point}", when)
        if (moment, now) == (f"save:{point}", when) and seen[0] == n:
            if when == "after":
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
            ready.write_text(str(os.getpid()))
            while True:
                time.sleep(60)

    on_moments(handler)


def slow_down(seconds: float) -> None:
    """Every training step takes at least ``seconds``."""
    on_moments(lambda moment, now, _: time.sleep(seconds) if (moment, now) == ("step", "before") else None)  # fmt: skip


class Phases:
    """The soak's view: which moment rank 0 is in, written to ``SOAK_PHASE`` and ``SOAK_LOG``;
    a save counts as training until one of its parts begins, and training resumes after it."""

    def __init__(self) -> None:
        self.file, self.log = os.environ.get("SOAK_PHASE"), os.environ.get("SOAK_LOG")
        name, _, seconds = os.environ.get("SOAK_PAUSE", "").rpartition(":")
        self.pause, self.pause_s = (name, float(seconds)) if name else (None, 0.0)
        self.current = None

    def __call__(self, moment: str, now: str, _path=None) -> None:
        if now == "before" and moment != "save":
            self.enter(moment)
        elif now == "after" and moment in ("eval", "save"):
            self.enter("step")

    def enter(self, phase: str) -> None:
        if phase == self.current:
            return
        self.current = phase  # written whole (a rename), so the soak never reads half a word
        if self.file:
            with open(self.file + ".new", "w") as f:
                f.write(phase)
            os.replace(self.file + ".new", self.file)
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps({"phase": phase, "t": time.time()}) + "\n")
        if phase == self.pause:
            self.pause = None
            time.sleep(self.pause_s)


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    rank = os.environ.get("RANK", "0")
    if os.environ.get("MINITURING_PID_DIR"):
        (Path(os.environ["MINITURING_PID_DIR"]) / f"rank-{rank}.pid").write_text(str(os.getpid()))
    if rank == "0" and (os.environ.get("SOAK_PHASE") or os.environ.get("SOAK_LOG")):
        phases = Phases()
        phases.enter("startup")
        on_moments(phases)
    if os.environ.get("MINITURING_FAULT"):
        point, _, n = os.environ["MINITURING_FAULT"].partition(":")
        freeze(point, int(n or 1), Path(os.environ["MINITURING_FAULT_READY"]))
    if os.environ.get("MINITURING_SLOW_STEPS"):
        slow_down(float(os.environ["MINITURING_SLOW_STEPS"]))
    import train

    train.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
