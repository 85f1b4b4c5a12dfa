"""Named text-to-text tasks: which pair sources train which task.

``--train-pairs title=titles.jsonl summarize=pairs.jsonl`` gives each source a task; a source
without a name (``pairs.jsonl``) is the task ``summarize``, as it always was. Each named task
is a prefix-LM objective of its own, with its own token in front of the source
(``model.tokenizer.task_token``), its own weight in ``--objectives``, metrics and decoding
defaults; ``summarize`` keeps the bare source.
"""

from __future__ import annotations

from pathlib import Path

from data.objectives import SELF_SUPERVISED
from model.tokenizer import DEFAULT_TASK, TASK_NAME


class TaskError(ValueError):
    """A pair source whose task name cannot be used."""


def split_source(spec: str) -> tuple[str | None, str]:
    """``"title=titles.jsonl"`` -> ``("title", "titles.jsonl")``; a source without a name (no
    ``=``, or a file or folder that exists under the whole spelling) -> ``(None, spec)``."""
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).expanduser().exists():
        return None, spec
    return name, path


def pair_tasks(specs: list[str], flag: str = "--train-pairs") -> dict[str, list[str]]:
    """The pair sources of each task, in the order given: ``{"summarize": [...], "title":
    [...]}``. Sources without a name are all ``summarize``'s; a named task takes one source
    (a folder holds many files). A ``TaskError`` names the source of a bad name, of a name
    given twice, or of a name an objective already has."""
    tasks: dict[str, list[str]] = {}
    named: dict[str, str] = {}
    for spec in specs:
        name, path = split_source(spec)
        if name is None:
            if DEFAULT_TASK in named:
                raise TaskError(
                    f"{flag} {spec}: a source without a task name is {DEFAULT_TASK}'s, and "
                    f"{named[DEFAULT_TASK]} already names {DEFAULT_TASK}; give each task one "
                    "source (a folder holds several files)"
                )
            tasks.setdefault(DEFAULT_TASK, []).append(path)
            continue
        if name in SELF_SUPERVISED:
            raise TaskError(
                f"{flag} {spec}: {name!r} is a self-supervised objective of the raw text, not a "
                f"task of pairs; name the task otherwise (say {name}_pairs=...)"
            )
        if not TASK_NAME.fullmatch(name):
            raise TaskError(
                f"{flag} {spec}: {name!r} is not a task name: expected a lowercase letter, then "
                "lowercase letters, digits or _ (at most 32), e.g. title=titles.jsonl"
            )
        if not path:
            raise TaskError(f"{flag} {spec}: no source after {name}=; expected {name}=FILE")
        if name in named or (name == DEFAULT_TASK and DEFAULT_TASK in tasks):
            first = named.get(name) or f"an unnamed source ({tasks[DEFAULT_TASK][0]})"
            raise TaskError(
                f"{flag} {spec}: task {name} is named twice (first by {first}); give each task "
                "one source (a folder holds several files)"
            )
        named[name] = spec
        tasks[name] = [path]
    return tasks


def named_tasks(specs: list[str]) -> list[str]:
    """The tasks of ``--train-pairs`` other than ``summarize``, in the order given."""
    return [name for name in pair_tasks(specs) if name != DEFAULT_TASK]


def check_eval_tasks(train: dict[str, list[str]], eval_specs: list[str]) -> dict[str, list[str]]:
    """``--eval-pairs``' sources by task (:func:`pair_tasks`); each named one must be a task
    that trains (unnamed sources are ``summarize``'s, held out as ever)."""
    evals = pair_tasks(eval_specs, "--eval-pairs")
    for name, paths in evals.items():
        if name != DEFAULT_TASK and name not in train:
            trained = ", ".join(train) or "none"
            raise TaskError(
                f"--eval-pairs {name}={paths[0]}: "
                f"task {name} has no training source in --train-pairs (tasks: {trained})"
            )
    return evals
