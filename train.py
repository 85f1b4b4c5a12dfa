"""Train minituring: masked-word prediction and summarization in one transformer.

    python train.py                                  # tiny preset, embedded corpus, all objectives
    python train.py --preset small --train-text docs/ --train-pairs pairs.jsonl
    python train.py --resume runs/default --max-steps 4000
    torchrun --nproc_per_node 8 train.py --preset base ...

The command line is the configuration: every field of the dataclasses in ``trainer/config.py``
is a flag, their docstrings are the --help, and the run's config.json holds them all, so
training again from it reproduces the run. The training itself is the ``trainer`` package.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gc
import inspect
import json
import logging
import signal
import sys
import time
from pathlib import Path

import psutil
import torch

from trainer.config import TrainConfig
from trainer.errors import TrainingError
from trainer.init_from import parent_options
from trainer.loop import Stopped, train
from trainer.samples import print_samples


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under a dataclass field) become --help text."""
    docs, tree = {}, ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _arg_type(annotation: str):
    if "list[str]" in annotation:
        return str, "+"
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if annotation.startswith(name):
            return typ, None
    return str, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    for group_field in dataclasses.fields(TrainConfig):
        sub = getattr(defaults, group_field.name)
        group = parser.add_argument_group(group_field.name)
        docs = _field_docs(type(sub))
        for f in dataclasses.fields(sub):
            flag = "--" + f.name.replace("_", "-")
            kwargs = dict(
                dest=f"{group_field.name}.{f.name}",
                default=argparse.SUPPRESS,
                help=docs.get(f.name, " "),
            )
            annotation = str(f.type)
            if annotation == "bool":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
                continue
            typ, nargs = _arg_type(annotation)
            value = getattr(sub, f.name)
            help_default = " (default: %s)" % (value if value not in (None, []) else "none")
            kwargs["help"] += help_default
            group.add_argument(flag, type=typ, nargs=nargs, metavar=f.name.upper(), **kwargs)
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags. With --resume, the run's saved config is the base and flags override it;
    with --init-from, the parent's model options are."""
    args = vars(build_parser().parse_args(argv))
    overrides: dict[str, dict] = {}
    for key, value in args.items():
        group, name = key.split(".")
        overrides.setdefault(group, {})[name] = value
    base = {}
    resume, parent = (overrides.get("run", {}).get(k) for k in ("resume", "init_from"))
    if resume and parent:
        raise SystemExit("error: --resume continues a run, --init-from starts a new one: not both")
    if parent:  # the parent's model options, under the flags given (those may not contradict)
        try:
            base = parent_options(parent, overrides)
        except TrainingError as err:
            raise SystemExit(f"error: {err}") from None
    if resume:
        config_file = Path(resume) / "config.json"
        if not config_file.is_file():
            raise SystemExit(f"error: --resume {resume}: no config.json there (not a run folder?)")
        base = json.loads(config_file.read_text()).get("training", {})
        # Options added since the run was written take the value the run was trained with.
        base.setdefault("model", {}).setdefault("copy_attention", False)
    merged = {
        g: {**base.get(g, {}), **overrides.get(g, {})} for g in ("model", "data", "optim", "run")
    }
    if resume:
        merged["run"]["output_dir"] = resume
    return TrainConfig.from_dict(merged)


def process_age() -> float:
    """Seconds since this process started, its imports included."""
    return max(0.0, time.time() - psutil.Process().create_time())


def main(argv: list[str] | None = None, **seams) -> None:
    """The command: flags -> config -> training -> samples. ``seams`` go to ``train`` (tests)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(argv)
    try:
        run = train(cfg, samples=True, **seams)
    except (TrainingError, ValueError, OSError) as err:
        # Configuration, data and run-folder errors carry their own explanation (file, record,
        # expectation): one line, no traceback.
        raise SystemExit(f"error: {err}") from None
    except Stopped as stopped:
        # Pre-empted (the checkpoint is saved): the status says the run did not finish.
        raise SystemExit(128 + stopped.signum) from None
    except KeyboardInterrupt:
        # A second Ctrl-C: stop at once, without a traceback; completed checkpoints are whole.
        print(f"interrupted; continue from the last complete checkpoint with: python train.py "
              f"--resume {cfg.run.output_dir}", file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(128 + signal.SIGINT) from None
    samples = run.samples
    # The run goes first, its DDP reducer with it, while the process group is alive: the group's
    # last reference dropped by the reducer's teardown joins gloo's worker threads while this
    # thread holds the GIL, and a worker still freeing a finished collective's tensors needs it
    # (a deadlock at exit, seen once in a two-process test).
    del run
    gc.collect()
    if samples is not None:
        print_samples(samples)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    # A time budget is the whole command's: the interpreter's start and the imports count.
    sys.exit(main(startup=process_age()))
