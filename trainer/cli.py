"""The command line for using a trained run: ``minituring`` (or ``python -m trainer.cli``).

    minituring fill-mask RUN "Return the [MASK] value of a number."
    minituring summarize RUN docs.txt --num-beams 4 --json
    minituring generate RUN docs.txt --task title        # a named task of the run
    minituring evaluate RUN --pairs test.jsonl title=titles.jsonl --text test.txt
    minituring plot RUN

It sits above ``model/`` and ``data/``: evaluation runs the trainer's own evaluator
(``trainer.evaluate``) on streams built by ``data.pipeline`` with the run's tokenizer and
training lengths, so the numbers are the trainer's held-out numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data.config import DataConfig
from data.pipeline import build_streams
from data.raw import RawData, read_pairs, read_texts
from data.sources import read_source_texts
from data.tasks import pair_tasks
from model.api import DEFAULT_GENERATION, LM, RunFolderError, load
from model.config import PRESETS, resolve_shape
from model.generate import DecodingConfig
from model.tokenizer import DEFAULT_TASK
from trainer.evaluate import evaluate
from trainer.plot import plot_run

SPLITS = ("line", "block", "file")
FILL_MASK_BATCH = 32


class CLIError(Exception):
    """Bad command-line input: printed as one line, no traceback."""


# ---------------------------------------------------------------------------- helpers


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name} asks for CUDA, but no CUDA device is available")
    return name


def _load(args) -> LM:
    return load(args.run, device=_device(args.device))


def _existing(path: str, flag: str) -> str:
    if not Path(path).exists():
        raise CLIError(f"{flag} {path}: no such file or folder")
    return path


def _split_documents(text: str, split: str) -> list[str]:
    """Standard input's documents. An empty one stays, and gets an empty summary: a line of
    its own (``line``; blank lines at the end are no documents) or the whole input (``file``),
    so that the output lines match the input's. Blocks are separated by blank lines, so none
    is empty."""
    if split == "file":
        return [text.strip()]
    if split == "block":
        return [d.strip() for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
    return [d.strip() for d in text.rstrip().splitlines()]


def _read_documents(source: str, split: str, text_column: str) -> list[str]:
    """Documents from stdin ('-') or a file read as the trainer reads --train-text."""
    if source == "-":
        docs = _split_documents(sys.stdin.read(), split)
        if not docs:
            raise CLIError("no documents on standard input")
        return docs
    return read_source_texts(_existing(source, "FILE"), text_column=text_column, split=split)


def _add_documents(sub: argparse.ArgumentParser, what: str, output: str) -> None:
    """The input options of summarize and generate: the documents and how to read them."""
    sub.add_argument("file", nargs="?", default="-", metavar="FILE",
                     help=f"{what}: a text file, a jsonl/csv/parquet file or - for stdin (default: -)")  # fmt: skip
    sub.add_argument("--split", choices=SPLITS, default="line",
                     help="a document per line, per blank-line block, or the whole file (default: %(default)s)")  # fmt: skip
    sub.add_argument("--text-column", default="text",
                     help="column holding the document in jsonl/csv/parquet files (default: %(default)s)")  # fmt: skip
    sub.add_argument("--batch-size", type=int, default=16,
                     help="documents decoded together (default: %(default)s)")  # fmt: skip
    sub.add_argument(
        "--json", action="store_true", help=f"print JSON instead of one {output} per line"
    )


def _add_decoding(parser: argparse.ArgumentParser) -> None:
    """The decoding flags. Those not given come from the run's generation_config.json (written
    by the trainer from its data), else from ``model.api.DEFAULT_GENERATION``."""
    d = DecodingConfig()
    run = "the run's generation_config.json"
    group = parser.add_argument_group("decoding")
    group.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                       help=f"longest summary in tokens (default: {run})")  # fmt: skip
    group.add_argument("--min-new-tokens", type=int, default=None, metavar="N",
                       help=f"shortest summary in tokens (default: {run})")  # fmt: skip
    group.add_argument("--num-beams", type=int, default=None, metavar="N",
                       help=f"beam search width; 1 is greedy (default: {run}; 1 with --do-sample)")  # fmt: skip
    group.add_argument("--length-penalty", type=float, default=None, metavar="X",
                       help=f"beam score = log-prob / length**X (default: {run})")  # fmt: skip
    group.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                       help=f"never repeat an n-gram of this size; 0: off (default: {run})")  # fmt: skip
    group.add_argument("--do-sample", action="store_true",
                       help="sample instead of beam search / greedy")  # fmt: skip
    group.add_argument("--top-k", type=int, default=d.top_k, metavar="K",
                       help="sample from the K likeliest tokens; 0: all (default: %(default)s)")  # fmt: skip
    group.add_argument("--top-p", type=float, default=d.top_p, metavar="P",
                       help="sample from the smallest set with probability >= P (default: %(default)s)")  # fmt: skip
    group.add_argument("--temperature", type=float, default=d.temperature, metavar="T",
                       help="sampling temperature (default: %(default)s)")  # fmt: skip
    group.add_argument("--seed", type=int, default=None,
                       help="random seed for sampling (default: a fresh one)")  # fmt: skip


def _decoding(args, defaults: dict) -> DecodingConfig:
    """The flags over ``defaults`` (a run's generation options); checked."""
    given = {
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "num_beams": 1 if args.num_beams is None and args.do_sample else args.num_beams,
        "length_penalty": args.length_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
    }
    options = {
        **DEFAULT_GENERATION,
        **defaults,
        **{k: v for k, v in given.items() if v is not None},
    }
    cfg = DecodingConfig(
        **options,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    cfg.validate()
    return cfg


def _print_json(value) -> None:
    json.dump(value, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")


# ---------------------------------------------------------------------------- fill-mask


def fill_mask_command(args) -> None:
    texts = []
    for t in args.text:
        texts += sys.stdin.read().splitlines() if t == "-" else [t]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CLIError("no text to fill: give a text with [MASK], or - to read lines from stdin")
    if args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    lm = _load(args)
    results = []
    starts = range(0, len(texts), FILL_MASK_BATCH)
    for start in tqdm(starts, desc="fill-mask", unit="batch", disable=None):
        chunk = texts[start : start + FILL_MASK_BATCH]
        for text, out in zip(chunk, lm.fill_mask(chunk, top_k=args.top_k), strict=True):
            # One list per mask, even for a single mask, so the JSON has one shape.
            masks = out if isinstance(out[0], list) else [out]
            results.append({"text": text, "masks": masks})
    if args.json:
        _print_json(results)
        return
    for r in results:
        print(r["text"])
        for m, options in enumerate(r["masks"], 1):
            if len(r["masks"]) > 1:
                print(f"  mask {m}:")
            # Quoted, so a token's leading space (a word start) or a blank token stays visible.
            tokens = [json.dumps(o["token"], ensure_ascii=False) for o in options]
            width = max(map(len, tokens))
            for rank, (token, o) in enumerate(zip(tokens, options, strict=True), 1):
                sequence = o["sequence"].replace("\n", "\\n")  # one line per prediction
                print(f"  {rank:>2}  {token:<{width}}  {o['score']:.4f}  {sequence}")


# ---------------------------------------------------------------------------- summarize


def summarize_command(args) -> None:
    _generate(args, DEFAULT_TASK, "summary")


def generate_command(args) -> None:
    _generate(args, args.task, "output")


def _generate(args, task: str, key: str) -> None:
    """The output of ``task`` for each document, one a line (or JSON objects with ``key``)."""
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    docs = _read_documents(args.file, args.split, args.text_column)
    _decoding(args, {})  # bad flags fail before the run is loaded
    lm = _load(args)
    if task not in lm.tasks:
        raise CLIError(f"--task {task}: {args.run} was trained on {', '.join(lm.tasks)}")
    options = dataclasses.asdict(_decoding(args, lm.generation_for(task)))
    outputs: list[str] = []
    starts = range(0, len(docs), args.batch_size)
    for n, start in enumerate(tqdm(starts, desc=task, unit="batch", disable=None)):
        # Each batch gets its own seed, so batches do not replay one random stream.
        seed = None if args.seed is None else args.seed + n
        chunk = docs[start : start + args.batch_size]
        outputs += lm.generate(chunk, task=task, batch_size=args.batch_size, seed=seed, **options)
    if args.json:
        _print_json([{"index": i, key: s} for i, s in enumerate(outputs)])
        return
    for s in outputs:
        print(" ".join(s.split()))


# ---------------------------------------------------------------------------- evaluate


class _Counting:
    """``inner`` as ``evaluate`` sees it, moving a progress bar at each call of one method.

    ``evaluate`` has no progress hook; counting the batches it takes from a stream and the
    summaries it decodes gives a progress bar without a second evaluation code path."""

    def __init__(self, inner, counted: str, bar: tqdm) -> None:
        self._inner, self._counted, self._bar = inner, counted, bar

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if name != self._counted:
            return attr

        def counted(*args, **kwargs):
            out = attr(*args, **kwargs)
            self._bar.update(1)
            return out

        return counted


def _training_settings(lm: LM) -> tuple[dict, int, int]:
    """The run's data config (as a dict, from the training options config.json records),
    block length and batch size."""
    training = getattr(lm.config, "training", None) or {}
    data = dict(training.get("data", {}))
    seq_len = lm.config.seq_len
    if seq_len is None:  # a folder from before the model recorded its lengths
        options = training.get("model", {})
        preset = options.get("preset") if options.get("preset") in PRESETS else "tiny"
        seq_len = resolve_shape(preset, seq_len=options.get("seq_len"))["seq_len"]
    if lm.config.position_limit is not None:  # rotary positions have no limit
        seq_len = min(seq_len, lm.config.position_limit)
    batch_size = training.get("optim", {}).get("batch_size", 32)
    return data, seq_len, batch_size


def evaluate_command(args) -> dict:
    if not args.pairs and not args.text:
        raise CLIError("nothing to evaluate: give --pairs FILE and/or --text FILE")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag in ("max_batches", "rouge_samples"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    sources = pair_tasks(args.pairs or [], "--pairs")
    lm = _load(args)
    unknown = [task for task in sources if task != DEFAULT_TASK and task not in lm.tasks]
    if unknown:
        raise CLIError(
            f"--pairs {unknown[0]}={sources[unknown[0]][0]}: {args.run} has no task {unknown[0]} "
            f"(its tasks: {', '.join(lm.tasks)})"
        )
    data, seq_len, run_batch = _training_settings(lm)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in data.items() if k in known})
    for flag in ("text_column", "document_column", "summary_column", "text_split", "mask_rate"):
        if getattr(args, flag) is not None:
            setattr(cfg, flag, getattr(args, flag))
    try:
        cfg.masking()
    except ValueError as e:
        raise CLIError(f"--mask-rate: {e}") from None
    texts = read_texts([_existing(args.text, "--text")], cfg) if args.text else []
    by_task = {
        task: read_pairs([_existing(p, "--pairs") for p in paths], cfg)
        for task, paths in sources.items()
    }
    pairs = by_task.pop(DEFAULT_TASK, [])
    objectives = (["masked_lm", "gap_summary"] if texts else []) + (["summarize"] if pairs else [])
    objectives += list(by_task)
    tasks = {task: ([], held, []) for task, held in by_task.items()}
    raw = RawData([], texts, [], pairs, "evaluation files", tasks=tasks)
    streams = build_streams(raw, lm.tokenizer, cfg, objectives, seq_len).eval
    if texts and len(streams["masked_lm"]) == 0:
        raise CLIError(
            f"--text {args.text} is too short: masked-token metrics need at least {seq_len} tokens"
        )

    batch_size = args.batch_size or run_batch
    max_batches = args.max_batches if args.max_batches is not None else sys.maxsize
    scored = {"summarize": pairs, **by_task} if pairs else by_task
    largest = max((len(p) for p in scored.values()), default=0)
    rouge_samples = largest if args.rouge_samples is None else args.rouge_samples
    counts = {task: min(rouge_samples, len(p)) for task, p in scored.items()}
    decodings = {task: _decoding(args, lm.generation_for(task)) for task in scored}
    decoding = decodings.get(DEFAULT_TASK) or _decoding(args, lm.generation)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    steps = sum(min(max_batches, math.ceil(len(s) / batch_size)) for s in streams.values())
    steps += sum(math.ceil(n / batch_size) for n in counts.values())
    with tqdm(total=steps, desc="evaluate", unit="batch", disable=None) as bar:
        results = evaluate(
            lm.model,
            _Counting(lm.tokenizer, "batch_decode", bar),
            {name: _Counting(s, "batch", bar) for name, s in streams.items()},
            batch_size=batch_size,
            max_batches=max_batches,
            rouge_samples=rouge_samples,
            decoding=decodings if by_task else decoding,
        )
    report = {
        "run": str(args.run),
        "text": args.text,
        "pairs": args.pairs[0] if args.pairs and len(args.pairs) == 1 else args.pairs,
        "examples": {name: min(len(s), max_batches * batch_size) for name, s in streams.items()}
        | {f"{task}/rouge": n for task, n in counts.items()},
        "settings": {
            "batch_size": batch_size,
            "seq_len": seq_len,
            "source_len": cfg.source_len,
            "target_len": cfg.target_len,
            "mask_rate": cfg.mask_rate,
            "decoding": dataclasses.asdict(decoding),
        },
        "metrics": results,
    }
    if by_task:  # each named task's own decoding
        report["settings"]["task_decoding"] = {
            task: dataclasses.asdict(decodings[task]) for task in by_task
        }
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        _print_json(report)
    else:
        print(format_table(report))
        if args.output:
            print(f"written to {args.output}")
    return report


def format_table(report: dict) -> str:
    """One row per objective, one column per metric; blank where a metric does not apply."""
    metrics = report["metrics"]
    objectives: list[str] = []
    columns: list[str] = []
    for key in metrics:
        name, metric = key.split("/", 1)
        # Seq2seq objectives report teacher-forced token accuracy: one column with masked_lm's.
        metric = "accuracy" if metric == "token_accuracy" else metric
        objectives += [name] if name not in objectives else []
        columns += [metric] if metric not in columns else []
    rows = [["objective", "examples", *columns]]
    for name in objectives:
        row = [name, str(report["examples"].get(name, ""))]
        for column in columns:
            value = metrics.get(f"{name}/{column}")
            if value is None and column == "accuracy":
                value = metrics.get(f"{name}/token_accuracy")
            row.append("" if value is None else f"{value:.4g}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.append(
        "accuracy: of masked tokens for masked_lm, of target tokens (teacher-forced) otherwise"
    )
    for name in objectives:
        if f"{name}/rouge1" in metrics:
            count = report["examples"].get(f"{name}/rouge", 0)
            what = "summaries" if name == DEFAULT_TASK else f"{name} outputs"
            lines.append(f"rouge: F1 x100 over {count} generated {what}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plot


def plot_command(args) -> None:
    run = Path(args.run)
    if not run.is_dir():
        raise RunFolderError(f"{run} is not a folder: expected a run folder (e.g. runs/default)")
    print(plot_run(run, args.output))


# ---------------------------------------------------------------------------- parser


def build_parser(prog: str = "minituring") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Use a trained minituring run folder: fill masks, summarize, evaluate, plot.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example: {prog} {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("run", metavar="RUN", help="a run folder written by train.py")
        return sub

    def device(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--device", default="cpu",
                         help="cpu, cuda, cuda:N or auto (default: %(default)s)")  # fmt: skip

    sub = command(
        "fill-mask",
        "Predict the words hidden by [MASK] in each text.",
        'fill-mask runs/default "Return the [MASK] value of a number." --top-k 3',
    )
    sub.add_argument("text", nargs="+", metavar="TEXT",
                     help="text with one or more [MASK]; - reads one text per line from stdin")  # fmt: skip
    sub.add_argument("--top-k", type=int, default=5, metavar="K",
                     help="predictions per mask (default: %(default)s)")  # fmt: skip
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    device(sub)
    sub.set_defaults(handler=fill_mask_command)

    sub = command(
        "summarize",
        "Write a summary of each document in FILE (or stdin).",
        "summarize runs/default docs.txt --num-beams 4 --json",
    )
    _add_documents(sub, "documents to summarize", "summary")
    _add_decoding(sub)
    device(sub)
    sub.set_defaults(handler=summarize_command)

    sub = command(
        "generate",
        "Write the output of one of the run's text-to-text tasks (--task) for each document in\n"
        "FILE (or stdin), decoded with that task's defaults.",
        "generate runs/tasks docs.txt --task title",
    )
    _add_documents(sub, "documents", "output")
    sub.add_argument("--task", default=DEFAULT_TASK,
                     help="summarize or a task the run was trained on (--train-pairs NAME=FILE) (default: %(default)s)")  # fmt: skip
    _add_decoding(sub)
    device(sub)
    sub.set_defaults(handler=generate_command)

    sub = command(
        "evaluate",
        "Held-out metrics with the trainer's evaluation: ROUGE-1/2/L of generated summaries\n"
        "against references (--pairs), masked-token accuracy and perplexity (--text).",
        "evaluate runs/default --pairs test.jsonl --text test.txt --output eval.json",
    )
    sub.add_argument("--pairs", metavar="[TASK=]FILE", nargs="+",
                     help="held-out pairs: jsonl, json, csv, tsv or parquet, or a folder of them; "
                          "TASK=FILE for a named task of the run (unnamed: summarize)")  # fmt: skip
    sub.add_argument(
        "--text",
        metavar="FILE",
        help="held-out text: a text file (split as --text-split), records or a folder",
    )
    sub.add_argument(
        "--output", metavar="JSON", help="also write the metrics and settings to this JSON file"
    )
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_argument("--batch-size", type=int, default=None,
                     help="sequences per batch (default: the run's training batch size)")  # fmt: skip
    sub.add_argument("--max-batches", type=int, default=None,
                     help="batches per objective for loss and accuracy (default: all)")  # fmt: skip
    sub.add_argument("--rouge-samples", type=int, default=None,
                     help="pairs decoded for ROUGE, per task (default: all)")  # fmt: skip
    sub.add_argument("--mask-rate", type=float, default=None,
                     help="share of the text's words masked for masked-token accuracy (default: "
                          "the run's training rate; give one rate to compare runs trained at "
                          "different rates)")  # fmt: skip
    for flag in ("text-column", "document-column", "summary-column"):
        sub.add_argument(f"--{flag}", default=None, help="column name (default: the run's)")
    sub.add_argument("--text-split", choices=SPLITS, default=None,
                     help="how a plain text file splits into documents (default: the run's)")  # fmt: skip
    _add_decoding(sub)
    device(sub)
    sub.set_defaults(handler=evaluate_command)

    sub = command(
        "plot",
        "Draw the run's training curves (loss per objective, held-out metrics) as a PNG.",
        "plot runs/default --output curves.png",
    )
    sub.add_argument(
        "--output", metavar="PNG", help="where to write (default: RUN/training_curves.png)"
    )
    sub.set_defaults(handler=plot_command)
    return parser


def main(argv: list[str] | None = None, prog: str = "minituring") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        args.handler(args)
        sys.stdout.flush()  # a reader gone shows here, not at the interpreter's exit
    except BrokenPipeError:  # e.g. piped into head: the reader has all it wanted
        return _broken_pipe()
    except (CLIError, RunFolderError, ValueError, OSError, ImportError) as err:
        # Input problems carry their own explanation (file, record, expectation).
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


def _broken_pipe() -> int:
    """Exit quietly when stdout's reader went away (the Python docs' "Note on SIGPIPE"):
    point stdout at devnull so that the interpreter's final flush raises nothing again, and
    exit 141 (128 + SIGPIPE), the status of ``cat``, ``yes`` and the like in the same pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
