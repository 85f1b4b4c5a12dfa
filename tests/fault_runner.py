"""Helpers for the fault and resume tests: functions that compare two run folders. The process
that freezes at an exact moment of a checkpoint save, for a test to kill it there, is
``python -m bench.faults`` (shared with the kill soak)."""

from __future__ import annotations

from pathlib import Path

# Metrics that must match between an interrupted-and-resumed run and an uninterrupted one;
# speeds and wall-clock times naturally differ.
COMPARED = ("lr", "grad_norm", "tokens")


def compared(record: dict) -> dict:
    return {
        k: v
        for k, v in record.items()
        if k in COMPARED or k.startswith(("loss/", "eval/", "val/")) or k == "step"
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
