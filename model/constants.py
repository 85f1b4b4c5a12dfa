"""Constants the model shares with the data that feeds it (``data/`` may import this module)."""

from __future__ import annotations

IGNORE_INDEX = -100
"""The label of a position with nothing to predict: no loss, no accuracy."""


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of ``multiple``. Sizes that vary from batch to batch are
    rounded so that CPU matrix kernels, prepared per shape, see few distinct shapes."""
    return -(-n // multiple) * multiple
