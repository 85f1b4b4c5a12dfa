"""One training process of ``bench/soak.py``: ``train.main`` with hooks that announce the
phase it is in, so that the soak knows where each kill landed, and can hold a chosen moment of
a save open long enough to kill the process right there.

    python bench/_soak_child.py [train.py flags...]

``SOAK_PHASE=FILE``: rank 0 writes its current phase there (one word, overwritten):
``startup``, ``data`` (corpus, tokenizer, tokenized streams, model, checkpoint loading),
``step``, ``eval``, ``save:weights``, ``save:optimizer``, ``save:rng``, ``save:state``,
``save:rename``, ``save:pointer``, ``save:export``, ``save:prune``, ``final`` (plot, samples).
``SOAK_LOG=FILE``: rank 0 appends ``{"phase", "t"}`` lines at each change (phase timings).
``SOAK_PAUSE=PHASE:SECONDS``: rank 0 sleeps that long on first reaching PHASE, before doing it.
``SOAK_PID_DIR=FOLDER``: each rank writes ``rank-R.pid`` there.

The hooks wrap the functions ``train`` calls, from outside; what is computed is unchanged.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Phases:
    def __init__(self) -> None:
        main = os.environ.get("RANK", "0") == "0"
        self.file = os.environ.get("SOAK_PHASE") if main else None
        self.log = os.environ.get("SOAK_LOG") if main else None
        pause = os.environ.get("SOAK_PAUSE", "") if main else ""
        name, _, seconds = pause.rpartition(":")
        self.pause, self.pause_s = (name, float(seconds)) if name else (None, 0.0)
        self.current = None

    def enter(self, phase: str) -> None:
        if phase == self.current:
            return
        self.current = phase
        if self.file:
            tmp = self.file + ".new"
            with open(tmp, "w") as f:
                f.write(phase)
            os.replace(tmp, self.file)
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps({"phase": phase, "t": time.time()}) + "\n")
        if phase == self.pause:
            self.pause = None
            time.sleep(self.pause_s)


def install(phases: Phases) -> None:
    import torch

    from trainer import checkpoint, loop, prepare

    def around(owner, name: str, phase, after: str | None = None) -> None:
        real = getattr(owner, name)  # a renamed hook point fails here, loudly

        def wrapped(*args, **kwargs):
            try:
                p = phase(*args, **kwargs) if callable(phase) else phase
            except TypeError:  # an argument that is no path (a buffer, a descriptor)
                p = None
            if p:
                phases.enter(p)
            result = real(*args, **kwargs)
            if after:
                phases.enter(after)
            return result

        setattr(owner, name, wrapped)

    in_tmp = lambda path: Path(path).parent.name.startswith(".step-")  # noqa: E731
    around(prepare, "load_raw", "data")
    around(loop, "lr_at", "step")  # once at the start of every step
    around(loop, "run_evaluation", "eval", after="step")
    around(loop, "save_checkpoint", None, after="step")
    around(
        checkpoint, "save_file", lambda t, f, **k: "save:weights" if in_tmp(f) else "save:export"
    )
    around(checkpoint.Checkpointer, "_prune", "save:prune")
    around(loop, "write_training_curves", lambda folder, quiet=False: None if quiet else "final")
    torch_names = {"optimizer.pt": "save:optimizer", "rng.pt": "save:rng"}
    around(torch, "save", lambda obj, f, *a, **k: torch_names.get(Path(f).name))
    texts = {"state.json": "save:state", "latest": "save:pointer"}
    around(checkpoint, "atomic_write_text", lambda path, text: texts.get(Path(path).name))
    renaming = lambda src, dst, *a, **k: (  # noqa: E731
        "save:rename" if Path(src).name.startswith(".step-") else None
    )
    around(os, "replace", renaming)


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    if os.environ.get("SOAK_PID_DIR"):
        rank = os.environ.get("RANK", "0")
        (Path(os.environ["SOAK_PID_DIR"]) / f"rank-{rank}.pid").write_text(str(os.getpid()))
    phases = Phases()
    phases.enter("startup")
    install(phases)
    import train

    train.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
