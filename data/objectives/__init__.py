"""The training objectives. Each turns token ids into model inputs and labels; the model
only sees which attention mask to use (``prefix_lengths`` or none).

Besides the three built-in objectives, every named text-to-text task of a run
(``--train-pairs title=titles.jsonl``, :mod:`data.tasks`) is an objective of its own: the
prefix-LM objective of ``summarize`` with the task's token in front of the source."""

from __future__ import annotations

import zlib

from model.tokenizer import DEFAULT_TASK, TASK_NAME

OBJECTIVES = ("masked_lm", "gap_summary", "summarize")
# The objectives that are not text-to-text tasks: no task may take their names.
SELF_SUPERVISED = ("masked_lm", "gap_summary")


def is_task(name: str) -> bool:
    """Whether ``name`` is a text-to-text task's objective: ``summarize`` or a named task."""
    return name == DEFAULT_TASK or (
        name not in SELF_SUPERVISED and TASK_NAME.fullmatch(name) is not None
    )


def is_objective(name: str) -> bool:
    return name in OBJECTIVES or is_task(name)


def objective_index(name: str) -> int:
    """The number an objective's random draws are keyed by (its example order, its masks): the
    built-in objectives' places in ``OBJECTIVES``, and for a named task a stable hash of its
    name, so that a task draws the same examples whatever other tasks a run has."""
    if name in OBJECTIVES:
        return OBJECTIVES.index(name)
    return len(OBJECTIVES) + zlib.crc32(name.encode())


def ordered(names) -> list[str]:
    """Objectives in their canonical order: the built-in ones first, then the named tasks by
    name (the mixture draws by this order, so the spelling of --objectives does not matter)."""
    names = list(dict.fromkeys(names))
    return [n for n in OBJECTIVES if n in names] + sorted(n for n in names if n not in OBJECTIVES)
