"""Helpers for the fault and resume tests: a runner for ``train.main`` in a child process that
can freeze at an exact moment of a checkpoint save (so a test can kill it right there), and
functions that compare two run folders.

    python tests/fault_runner.py [train.py flags...]

``MINITURING_FAULT=POINT:N`` freezes the N-th time POINT is reached; the process then creates
the file named by ``MINITURING_FAULT_READY`` and sleeps until it is killed. Points:

    weights    a checkpoint's model.safetensors half written (in its temporary folder)
    optimizer  a checkpoint's optimizer.pt half written
    rename     the checkpoint complete under its temporary name, not yet renamed
    pointer    the checkpoint renamed, ``checkpoints/latest`` not yet switched to it
    export     ``latest`` switched, the run folder's own model.safetensors half written

``MINITURING_SLOW_STEPS=SECONDS`` makes every training step last at least that long, so that a
test can signal or kill the process in the middle of training rather than after it.
``MINITURING_PID_DIR=FOLDER`` makes each process write ``rank-R.pid`` there (under torchrun,
so that a test can signal one chosen process).

The hooks wrap the functions ``train`` calls, from outside: the trainer has no test-only code.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

POINTS = ("weights", "optimizer", "rename", "pointer", "export")


def _freeze(ready: Path) -> None:
    ready.write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def _truncate_half(path: str | Path) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _patch(module, name: str, value) -> None:
    """Replace ``module.name``, which must exist: a rename in the trainer fails the test loudly
    instead of leaving the fault uninstalled."""
    if not hasattr(module, name):
        raise SystemExit(f"fault_runner: {module.__name__}.{name} does not exist")
    setattr(module, name, value)


def install(point: str, n: int, ready: Path) -> None:
    """Patch the trainer so that the n-th arrival at ``point`` freezes the process."""
    import torch

    from trainer import checkpoint

    if point not in POINTS:
        raise SystemExit(f"fault_runner: unknown point {point!r}; expected one of {POINTS}")
    seen = {"count": 0}

    def arrive() -> bool:
        seen["count"] += 1
        return seen["count"] == n

    in_checkpoint = lambda path: Path(path).parent.name.startswith(".step-")  # noqa: E731

    real_save_file = checkpoint.save_file

    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        inside = in_checkpoint(filename)
        if (point == "weights" and inside) or (point == "export" and not inside):
            if arrive():
                _truncate_half(filename)
                _freeze(ready)

    _patch(checkpoint, "save_file", save_file)

    real_torch_save = torch.save

    def torch_save(obj, f, *args, **kwargs):
        real_torch_save(obj, f, *args, **kwargs)
        if point == "optimizer" and Path(f).name == "optimizer.pt" and arrive():
            _truncate_half(f)
            _freeze(ready)

    torch.save = torch_save

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if point == "rename" and Path(src).name.startswith(".step-") and arrive():
            _freeze(ready)
        return real_replace(src, dst, *args, **kwargs)

    _patch(os, "replace", replace)

    real_write = checkpoint.atomic_write_text

    def atomic_write_text(path: Path, text: str) -> None:
        if point == "pointer" and Path(path).name == "latest" and arrive():
            _freeze(ready)
        real_write(path, text)

    _patch(checkpoint, "atomic_write_text", atomic_write_text)


def slow_down(seconds: float) -> None:
    """Every training step takes at least ``seconds`` (the learning rate is set once a step)."""
    from trainer import loop

    real_lr_at = loop.lr_at

    def lr_at(*args, **kwargs):
        time.sleep(seconds)
        return real_lr_at(*args, **kwargs)

    _patch(loop, "lr_at", lr_at)


def run(argv: list[str]) -> None:
    """Set up this process like a test run, install the fault (if any), train."""
    import torch

    torch.set_num_threads(1)
    if os.environ.get("MINITURING_PID_DIR"):
        rank = os.environ.get("RANK", "0")
        (Path(os.environ["MINITURING_PID_DIR"]) / f"rank-{rank}.pid").write_text(str(os.getpid()))
    fault = os.environ.get("MINITURING_FAULT")
    if fault:
        point, _, n = fault.partition(":")
        install(point, int(n or 1), Path(os.environ["MINITURING_FAULT_READY"]))
    if os.environ.get("MINITURING_SLOW_STEPS"):
        slow_down(float(os.environ["MINITURING_SLOW_STEPS"]))
    import train

    train.main(argv)


# ---------------------------------------------------------------------------- comparing runs

# Metrics that must match between an interrupted-and-resumed run and an uninterrupted one;
# speeds and wall-clock times naturally differ.
COMPARED = ("lr", "grad_norm", "tokens")


def compared(record: dict) -> dict:
    return {
        k: v
        for k, v in record.items()
        if k in COMPARED or k.startswith(("loss/", "eval/")) or k == "step"
    }


def assert_same_run(a: Path, b: Path, rel: float = 1e-5, abs_: float = 1e-6) -> None:
    """Same metrics line by line (losses, learning rate, gradient norm, evaluation) and the same
    final weights, to floating-point tolerance."""
    import pytest
    import torch
    from conftest import metrics
    from safetensors.torch import load_file

    ma, mb = [compared(m) for m in metrics(a)], [compared(m) for m in metrics(b)]
    assert [sorted(m) for m in ma] == [sorted(m) for m in mb], "different metrics lines"
    for x, y in zip(ma, mb, strict=True):
        assert x["step"] == y["step"]
        for key, value in x.items():
            assert y[key] == pytest.approx(value, rel=rel, abs=abs_), (x["step"], key)
    wa = load_file(str(Path(a) / "model.safetensors"))
    wb = load_file(str(Path(b) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=rel, atol=abs_, msg=key)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    run(sys.argv[1:])
