"""A run's training curves as one PNG, drawn from its metrics.jsonl: readable without a server.

Four panels against the optimizer step: the loss of each objective (training solid, held-out
dashed, one colour per objective; each named task is one), held-out accuracy, held-out ROUGE
(ROUGE-L per task when there are named tasks), and the learning rate with the throughput, drawn with matplotlib (a dependency of the package).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data.objectives import OBJECTIVES
from model.files import atomic_path

PLOT_FILE = "training_curves.png"
PLOT_EXTRA = "pip install matplotlib"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl, each an object with an integer ``step``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: expected the metrics.jsonl of a training run")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {number}: expected an object with an integer 'step'")
        records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric, in file order, where it was recorded."""
    points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), int | float)]
    return [s for s, _ in points], [v for _, v in points]


def _objectives(keys: set[str]) -> list[str]:
    found = {k.split("/")[1] for k in keys if k.startswith(("eval/", "val/"))}
    found |= {k.split("/")[1] for k in keys if k.startswith("loss/")}
    found.discard("tasks")  # the tasks' mean ROUGE-L, no objective of its own
    return sorted(found, key=lambda n: (OBJECTIVES + (n,)).index(n))


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            f"plotting training curves needs matplotlib, which is not installed: {PLOT_EXTRA}"
        ) from None
    return Figure


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_lines(ax, records: list[dict], lines: list[tuple[str, str, str, str]]) -> list[str]:
    """Draw each (metric, format, colour, label) of ``lines`` that was recorded; the metrics
    drawn."""
    drawn = []
    for key, fmt, color, label in lines:
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, fmt, color=color, label=label)
            drawn.append(key)
    return drawn


def _finish_panel(ax, drawn: list[str], what: str, **labels: str) -> None:
    """Title, axis labels and legend on a panel with lines; "no ``what`` recorded" on one
    without."""
    if drawn:
        ax.set(**labels)
        ax.legend(fontsize="small")
    else:
        _empty(ax, what)


def plot_metrics(records: list[dict], output: str | os.PathLike, title: str = "") -> Path:
    """Draw the four panels from metrics records and write them as a PNG (atomically)."""
    figure_class = _figure_class()
    keys = {k for r in records for k in r}
    objectives = _objectives(keys)
    fig = figure_class(figsize=(12, 8), dpi=100, layout="constrained")
    # One step axis for all four, so a single evaluation sits where it happened.
    (loss_ax, acc_ax), (rouge_ax, lr_ax) = fig.subplots(2, 2, sharex=True)
    colors = {name: f"C{i}" for i, name in enumerate(objectives)}

    loss_lines = [
        line
        for name in objectives
        for line in (
            (f"loss/{name}", "-", colors[name], f"{name} (train)"),
            (f"val/{name}/loss", "s:", colors[name], f"{name} (validation)"),
            (f"eval/{name}/loss", "o--", colors[name], f"{name} (held-out)"),
        )
    ]
    drawn = _draw_lines(loss_ax, records, loss_lines)
    _finish_panel(loss_ax, drawn, "loss", title="loss per objective", ylabel="cross-entropy")

    accuracy_lines = [
        (f"{split}/{name}/{metric}", fmt, colors[name], f"{name} {metric}{label}")
        for split, fmt, label in (("val", "s:", " (validation)"), ("eval", "o-", ""))
        for name in objectives
        for metric in ("accuracy", "token_accuracy")
    ]
    drawn = _draw_lines(acc_ax, records, accuracy_lines)
    _finish_panel(acc_ax, drawn, "held-out accuracy", title="held-out accuracy", ylabel="accuracy")

    tasks = [n for n in objectives if any(k.endswith(f"/{n}/rougeL") for k in keys)]
    if tasks in ([], ["summarize"]):
        rouge_lines = [
            line
            for i, metric in enumerate(("rouge1", "rouge2", "rougeL"))
            for line in (
                (f"val/summarize/{metric}", "s:", f"C{i}", f"{metric} (validation)"),
                (f"eval/summarize/{metric}", "o-", f"C{i}", metric),
                # The lead baseline (the document's first words), where the evaluation has it.
                (f"eval/summarize/lead_{metric}", "x:", f"C{i}", f"{metric}, lead baseline"),
            )
        ]
    else:  # several tasks, or a named one: ROUGE-L of each, in its objective's colour
        rouge_lines = [
            line
            for name in tasks
            for line in (
                (f"val/{name}/rougeL", "s:", colors[name], f"{name} rougeL (validation)"),
                (f"eval/{name}/rougeL", "o-", colors[name], f"{name} rougeL"),
                (f"eval/{name}/lead_rougeL", "x:", colors[name], f"{name} rougeL, lead baseline"),
            )
        ]
    drawn = [key for key in _draw_lines(rouge_ax, records, rouge_lines) if "/lead_" not in key]
    _finish_panel(
        rouge_ax,
        drawn,
        "ROUGE",
        title="held-out summaries: ROUGE F1",
        xlabel="step",
        ylabel="ROUGE (x100)",
    )

    steps, values = series(records, "lr")
    if steps:
        lr_ax.plot(steps, values, color="C0", label="learning rate")
        lr_ax.set(title="learning rate and throughput", xlabel="step", ylabel="learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        steps, values = series(records, "tokens_per_s")
        if steps:
            speed_ax = lr_ax.twinx()
            speed_ax.plot(steps, values, ":", color="C1", label="tokens/s")
            speed_ax.set_ylabel("tokens/s")
            handles = lr_ax.get_legend_handles_labels()[0] + speed_ax.get_legend_handles_labels()[0]
            lr_ax.legend(handles=handles, fontsize="small")
    else:
        _empty(lr_ax, "learning rate")

    if title:
        fig.suptitle(title)
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    return output


def plot_run(run: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write ``RUN/training_curves.png`` (or ``output``) from ``RUN/metrics.jsonl``."""
    run = Path(run)
    records = read_metrics(run / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run / 'metrics.jsonl'} holds no records yet: nothing to plot")
    last = max(r["step"] for r in records)
    return plot_metrics(records, output or run / PLOT_FILE, title=f"{run.name}: step {last}")
