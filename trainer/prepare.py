"""Everything a run needs before its first step, in order: the run folder, the data and the
tokenizer, the model (wrapped for the device and the processes), the optimizer and the data
loader, restored from the last checkpoint when resuming. ``prepare`` returns them as a ``Run``."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.batching import MixtureLoader
from data.objectives import OBJECTIVES
from data.pipeline import Streams, build_streams
from data.prefetch import Prefetcher
from data.raw import RawData, load_raw
from data.streaming import (
    StreamingLoader,
    build_streamed,
    load_streamed,
    text_dataset,
    tokenizer_sample,
)
from data.vocab import save_tokenizer, train_tokenizer
from model.api import (
    DEFAULT_GENERATION,
    read_generation_config,
    read_task_generation,
    save_generation_config,
)
from model.config import MiniTuringConfig
from model.hf import save_remote_code
from model.tokenizer import (
    DEFAULT_TASK,
    TokenizerError,
    check_compatible,
    load_tokenizer,
    task_ids,
    with_task_tokens,
)
from model.transformer import MiniTuringModel
from trainer.checkpoint import Checkpointer, check_resumed_model
from trainer.config import (
    TrainConfig,
    block_length,
    build_model_config,
    check_config,
    parse_objectives,
)
from trainer.distributed import Env, from_rank0, local_main_first, setup_env, wrap_model
from trainer.errors import TrainingError
from trainer.init_from import parent_config, start_from_parent
from trainer.lock import hold_run_folder
from trainer.metrics import Metrics, check_report_to
from trainer.optim import MuonAdamW, make_optimizer

log = logging.getLogger("minituring")


@dataclass
class TrainState:
    """What the loop changes as it trains, saved in every checkpoint's state.json."""

    step: int = 0
    tokens: int = 0
    planned_steps: int | None = None
    lr_ceiling: float | None = None  # the latest rate after warm-up: never raised again
    bad_steps: int = 0  # consecutive steps with a non-finite loss or gradient
    skipped_steps: int = 0
    elapsed: float = 0.0  # training seconds before this process started
    global_batch: int | None = None
    data: dict = field(default_factory=dict)  # the loader's position
    # The losses of the log window a checkpoint cut in two, so the resumed run logs the same.
    window_losses: dict = field(default_factory=dict)
    # The evaluation whose weights RUN/model.safetensors keeps: step, metric, value.
    kept: dict | None = None
    # --patience: validation evaluations in a row without an improvement, and, once it ran
    # out, the final decay decided then (trainer/patience.py).
    evaluations_without_improvement: int = 0
    stopping: dict | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class RunData:
    """A run's data, prepared before its model: what was read, the tokenizer, the objectives'
    example streams and the mixture over them."""

    raw: RawData
    tokenizer: object
    streams: Streams
    weights: dict[str, float]  # the mixture
    seconds: float = 0.0  # the time its preparation took


@dataclass
class Run:
    """The parts of a run, made by ``prepare`` and used by the loop."""

    cfg: TrainConfig
    env: Env
    data: RunData
    model: MiniTuringModel  # the plain model (under FSDP: with sharded parameters)
    wrapped: torch.nn.Module  # what the loop calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer | MuonAdamW
    loader: MixtureLoader | StreamingLoader | Prefetcher
    checkpointer: Checkpointer
    metrics: Metrics
    state: TrainState
    generation: dict  # summarize's decoding options, as generation_config.json holds them
    # Each named task's decoding options, by name (generation_config.json's "tasks").
    task_generation: dict = field(default_factory=dict)
    samples: dict | None = None  # what the run ends with when asked (trainer.samples)

    @property
    def folder(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def resumed(self) -> bool:
        return self.cfg.run.resume is not None

    @property
    def global_batch(self) -> int:
        return self.cfg.optim.batch_size * self.cfg.optim.grad_accum * self.env.world_size


def prefetch_depth(asked: int | None, device: torch.device) -> int:
    """Batches drawn ahead on a thread (``--prefetch``; unset: 2 on CUDA, none on CPU, where
    the step's math uses every core and the data wait is under 1% of a step)."""
    if asked is not None:
        return asked
    return 2 if device.type == "cuda" else 0


def prepare(
    cfg: TrainConfig,
    cleanup: contextlib.ExitStack,
    make_loader: Callable[..., MixtureLoader] | None = None,
) -> Run:
    """Check the configuration, then build every part of the run (see the module's doc). What
    the run holds until it ends (the run folder's lock, the prefetch thread) goes on
    ``cleanup``, for the caller to release. ``make_loader`` defaults to the mixture loader, or
    the streaming one with --streaming."""
    check_config(cfg)
    check_report_to(cfg.run.report_to)
    if cfg.run.init_from and cfg.run.resume is None:
        parent_config(Path(cfg.run.init_from))  # the parent's files are there, before any work
    env = setup_env(cfg.run)
    folder = Path(cfg.run.output_dir)
    claim_folder(cfg, env, folder, cleanup)
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    data = prepare_data(cfg, env, folder)
    release_freed_memory()
    model = build_model(cfg, data.tokenizer, folder)
    wrapped = wrap_model(
        model,
        env,
        activation_checkpointing=cfg.run.activation_checkpointing,
        compile=cfg.run.compile,
    )
    optimizer = make_optimizer(model, cfg.optim)
    loader = build_loader(cfg, env, data, make_loader, cleanup)
    checkpointer = Checkpointer(
        folder, cfg.run.keep_checkpoints, main=env.main, every=cfg.run.save_every
    )
    if cfg.run.resume is not None:
        state = restore(checkpointer, model, optimizer, loader)
    else:
        state = TrainState()
        if env.main:
            write_run_folder(cfg, folder, model.config, data)
    generation = {**DEFAULT_GENERATION, **from_rank0(env, lambda: read_generation_config(folder))}
    saved_tasks = from_rank0(env, lambda: read_task_generation(folder))
    task_generation = {
        name: {**DEFAULT_GENERATION, **saved_tasks.get(name, {})}
        for name in task_ids(data.tokenizer)
    }
    resume_step = state.step if cfg.run.resume is not None else None
    metrics = Metrics(folder / "metrics.jsonl", env.main, resume_step, report_to=cfg.run.report_to)
    run = Run(
        cfg=cfg,
        env=env,
        data=data,
        model=model,
        wrapped=wrapped,
        optimizer=optimizer,
        loader=loader,
        checkpointer=checkpointer,
        metrics=metrics,
        state=state,
        generation=generation,
        task_generation=task_generation,
    )
    if env.main:
        print(describe(run), flush=True)
    _check_global_batch(run)
    return run


def claim_folder(cfg: TrainConfig, env: Env, folder: Path, cleanup: contextlib.ExitStack) -> None:
    """The run folder, writable and locked for this run, before any work: a second trainer
    (fresh or --resume) stops here, and so does a fresh run in a folder that holds one."""
    if env.main:
        _check_writable(folder)
    cleanup.enter_context(hold_run_folder(folder, main=env.main, distributed=env.distributed))
    resuming = cfg.run.resume is not None
    if env.main and not resuming and (folder / "checkpoints" / "latest").exists():
        raise TrainingError(
            f"{folder} already holds a run; continue it with --resume {folder} "
            "or choose another --output-dir"
        )


def build_model(cfg: TrainConfig, tokenizer, folder: Path) -> MiniTuringModel:
    """The model the options build for ``tokenizer``; resuming, it must be the one the run
    folder holds; with --init-from, it is the parent's, holding the parent's weights."""
    model_config = build_model_config(cfg, tokenizer)
    model = MiniTuringModel(model_config)
    if cfg.run.resume is not None:
        saved = MiniTuringConfig.from_pretrained(folder)
        check_compatible(tokenizer, saved, where=str(folder))
        check_resumed_model(saved, model_config, folder)
        check_resumed_optimizer(saved, cfg.optim.optimizer, folder)
        if getattr(saved, "init_from", None):  # a child run: its parent, for summary.json
            model_config.init_from = saved.init_from
    elif cfg.run.init_from:
        # The parent's weights, read by every process before wrap_model shards or replicates
        # them; config.json (written from this config) records where they came from.
        model_config.init_from = start_from_parent(model, Path(cfg.run.init_from), tokenizer)
    return model


def check_resumed_optimizer(saved: MiniTuringConfig, optimizer: str, folder: Path) -> None:
    """A resumed run keeps the optimizer its checkpoints hold the state of (runs from before
    --optimizer trained with AdamW)."""
    trained = (getattr(saved, "training", None) or {}).get("optim", {}).get("optimizer", "adamw")
    if trained != optimizer:
        raise TrainingError(
            f"--resume {folder}: the run was trained with --optimizer {trained}; a resumed run "
            f"keeps its optimizer, whose state its checkpoints hold. Drop --optimizer "
            f"{optimizer}, or start a new run from its weights: --init-from {folder} "
            f"--optimizer {optimizer} --output-dir NEW_FOLDER"
        )


def build_loader(
    cfg: TrainConfig,
    env: Env,
    data: RunData,
    make_loader: Callable[..., MixtureLoader] | None,
    cleanup: contextlib.ExitStack,
) -> MixtureLoader | StreamingLoader | Prefetcher:
    """This process's batches of the mixture, drawn ahead on a thread where that pays."""
    if make_loader is None:
        make_loader = StreamingLoader if cfg.data.streaming else MixtureLoader
    loader = make_loader(
        data.streams.train,
        data.weights,
        cfg.optim.batch_size,
        cfg.run.seed,
        rank=env.rank,
        world_size=env.world_size,
    )
    depth = prefetch_depth(cfg.run.prefetch, env.device)
    if depth:
        loader = Prefetcher(loader, depth, pin_memory=env.device.type == "cuda")
        cleanup.callback(loader.close)
    return loader


def restore(checkpointer: Checkpointer, model, optimizer, loader) -> TrainState:
    """Resuming: the weights, optimizer, RNG and data position of the last complete
    checkpoint; the state the loop continues from."""
    latest = checkpointer.latest()
    if latest is None:
        raise TrainingError(
            f"--resume {checkpointer.folder}: no complete checkpoint in {checkpointer.dir} (the "
            "run stopped before its first save); start it again without --resume"
        )
    state = TrainState.from_dict(checkpointer.load(latest, model, optimizer))
    loader.load_state_dict(state.data)
    checkpointer.finish(latest, model)
    return state


def write_run_folder(
    cfg: TrainConfig, folder: Path, model_config: MiniTuringConfig, data: RunData
) -> None:
    """A fresh run's folder, before its first step: the model's config (with the training
    options that made it), tokenizer, remote code and generation defaults."""
    model_config.training = cfg.to_dict()
    model_config.save_pretrained(folder)
    save_tokenizer(data.tokenizer, folder)
    save_remote_code(folder)  # AutoModel*.from_pretrained(folder, trust_remote_code=True)
    target_len = cfg.data.target_len
    tasks = {
        name: task_generation_defaults(data.streams.train[name], target_len)
        for name in task_ids(data.tokenizer)
        if name in data.streams.train
    }
    save_generation_config(folder, tasks=tasks, **generation_defaults(data.streams, target_len))


def release_freed_memory() -> None:
    """Hand the memory freed since start-up back to the system (glibc's ``malloc_trim``): a
    cold preparation (tokenizing the corpus) leaves the heap hundreds of MB above what the
    run keeps, and glibc returns only the top of its heap by itself. Elsewhere a no-op."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise TrainingError(f"cannot write to output folder {folder}: {err.strerror}") from None


def prepare_data(cfg: TrainConfig, env: Env, folder: Path) -> RunData:
    """Raw data, tokenizer, the objectives' streams and the mixture's weights, timed. With
    several processes, each machine's first one builds the corpus and tokenization caches while
    the others wait and then read them, and the tokenizer is trained once, by rank 0, and sent
    to the others."""
    t0 = time.perf_counter()
    seq_len = block_length(cfg)
    if cfg.data.streaming:
        data = _streamed_data(cfg, env, folder, seq_len)
    else:
        data = _prepared_data(cfg, env, folder, seq_len)
    data.seconds = time.perf_counter() - t0
    return data


def _prepared_data(cfg: TrainConfig, env: Env, folder: Path, seq_len: int) -> RunData:
    with local_main_first(env):
        raw = load_raw(cfg.data)
    available = [n for n in OBJECTIVES if raw.has(n)] + [n for n in raw.tasks if raw.has(n)]
    pairs = {task: len(raw.pairs(task, "train")) for task in raw.task_names if raw.has(task)}
    weights = parse_objectives(cfg.run.objectives, available, pairs=pairs)
    objectives = [n for n, w in weights.items() if w > 0]

    def sample() -> Iterable[str]:
        documents = [d for task in raw.task_names for d, _ in raw.pairs(task, "train")]
        return raw.train_texts + documents

    tokenizer = _tokenizer(cfg, env, folder, sample, tasks=list(raw.tasks))
    with local_main_first(env):
        streams = build_streams(raw, tokenizer, cfg.data, objectives, seq_len, cfg.optim.batch_size)
    if cfg.run.objectives.strip() == "auto":
        # "Every objective with data": one whose examples all fell away (no document with two
        # sentences for gap_summary, say) is left out rather than failing the run.
        for name in [n for n in objectives if len(streams.train[n]) == 0]:
            if env.main:
                log.warning("objective %s has no training examples; left out of the mixture", name)
            weights.pop(name)
            objectives.remove(name)
            streams.train.pop(name)
            streams.eval.pop(name, None)
            streams.val.pop(name, None)
        if not objectives:
            raise TrainingError("no objective has training examples in the given data")
    return RunData(raw, tokenizer, streams, weights)


def _tokenizer(
    cfg: TrainConfig,
    env: Env,
    folder: Path,
    texts: Callable[[], Iterable[str]],
    tasks: list[str] = (),
):
    """The run's tokenizer (resuming), the parent's (--init-from), the given one (--tokenizer),
    or one trained by rank 0 on ``texts()`` and sent to the others; with a special token for
    each named task of ``tasks`` it lacks, after its last entry (a resumed run has them all)."""
    if cfg.run.resume is not None:
        tokenizer = load_tokenizer(folder)
        missing = [t for t in tasks if t not in task_ids(tokenizer)]
        if missing:
            raise TokenizerError(
                f"--resume {folder}: the run has no task {', '.join(missing)} (its tasks: "
                f"{', '.join([DEFAULT_TASK, *task_ids(tokenizer)])}); a resumed run keeps its "
                "tokenizer: start a new run from it with --init-from to add a task"
            )
        return tokenizer
    if cfg.run.init_from:
        return with_task_tokens(load_tokenizer(cfg.run.init_from), tasks)
    if cfg.data.tokenizer:
        return with_task_tokens(load_tokenizer(cfg.data.tokenizer), tasks)
    kind, size = cfg.data.tokenizer_kind, cfg.data.vocab_size
    trained = from_rank0(env, lambda: train_tokenizer(texts(), kind=kind, vocab_size=size))
    return with_task_tokens(trained, tasks)


def _streamed_data(cfg: TrainConfig, env: Env, folder: Path, seq_len: int) -> RunData:
    """``prepare_data`` for --streaming (:mod:`data.streaming`): the held-out text is read (and,
    from --eval-text, prepared) here; the training text is only opened, this process's part of
    it. A tokenizer to train learns from the stream's first documents, on rank 0."""
    with local_main_first(env):
        raw = load_streamed(cfg.data)
    weights = parse_objectives(cfg.run.objectives, ["masked_lm"])
    tokenizer = _tokenizer(cfg, env, folder, lambda: tokenizer_sample(cfg.data))

    def make_dataset():
        return text_dataset(cfg.data, rank=env.rank, world_size=env.world_size)

    with local_main_first(env):
        streams = build_streamed(raw, make_dataset, tokenizer, cfg.data, seq_len)
    return RunData(raw, tokenizer, streams, weights)


# Repeated bigrams are blocked in the summaries when at most this share of the training
# summaries repeats a bigram of tokens (one-line summaries: 16% of the docstring summary lines),
# repeated trigrams otherwise (the common setting for longer, multi-sentence summaries).
# On 743 development docstring pairs, bigram blocking scored +0.47 ROUGE-L (+2.0 ROUGE-1)
# over trigram blocking (bench/decoding.py, docs/performance.md).
BIGRAM_BLOCKING_SHARE = 0.2


def generation_defaults(streams: Streams, target_len: int) -> dict:
    """summarize's decoding defaults for this data (:func:`task_generation_defaults` of its
    training pairs, else of the gap sentences). A run without either keeps the package's
    defaults."""
    stream = streams.train.get("summarize") or streams.train.get("gap_summary")
    # summarize's shortest length counts the end token, as it always has; a named task's does
    # not. Decoding the default job's 377 validation pairs with the other rule (min_new_tokens 7
    # instead of 8) changed 115 summaries and ROUGE-L by -0.24 +- 0.23 (paired), so it stays.
    return task_generation_defaults(stream, target_len, end_in_shortest=True)


def task_generation_defaults(stream, target_len: int, *, end_in_shortest: bool = False) -> dict:
    """A task's decoding defaults from its training targets (``stream``): the longest from the
    targets' lengths in tokens with the end token (their 98th percentile), the shortest from
    their 2nd percentile without it (``min_new_tokens`` counts the tokens before the end;
    ``end_in_shortest``: with it, summarize's rule), beam search with repeated n-grams blocked
    (bigrams where the targets rarely repeat one, trigrams otherwise). No stream, or an empty
    one: the package's defaults."""
    options = dict(DEFAULT_GENERATION)
    if stream is None or len(stream) == 0:
        return options
    picked = np.unique(np.linspace(0, len(stream) - 1, min(len(stream), 2000)).astype(int))
    targets = [ids[prefix:] for ids, _, prefix in map(stream.example, picked.tolist())]
    shortest, longest = np.percentile([len(t) + 1 for t in targets], [2, 98])
    shortest -= 0 if end_in_shortest else 1
    options["max_new_tokens"] = int(max(2, min(target_len, math.ceil(longest))))
    options["min_new_tokens"] = int(max(1, min(math.floor(shortest), options["max_new_tokens"])))
    if repeat_share(targets, 2) <= BIGRAM_BLOCKING_SHARE:
        options["no_repeat_ngram_size"] = 2
    return options


def repeat_share(targets: list, n: int) -> float:
    """The share of ``targets`` (token id sequences) in which some n-gram occurs twice."""

    def repeats(ids) -> bool:
        grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
        return len(set(grams)) < len(grams)

    return sum(map(repeats, targets)) / max(len(targets), 1)


def _check_global_batch(run: Run) -> None:
    """The learning rate and schedule are per optimizer step of the global batch; a run resumed
    on another number of processes continues the same recipe only with the same global batch."""
    saved = run.state.global_batch or run.global_batch
    if saved != run.global_batch and run.env.main:
        print(
            f"warning: the checkpoint was trained with a global batch of {saved} sequences, this "
            f"run's is {run.global_batch}; to continue the same recipe on {run.env.world_size} "
            "process(es), choose --batch-size and --grad-accum so that batch x accumulation x "
            f"processes = {saved}",
            flush=True,
        )
    run.state.global_batch = run.global_batch


def describe(run: Run) -> str:
    """What the run is, printed before its first step."""
    cfg, env = run.cfg, run.env
    n_params = sum(p.numel() for p in run.model.parameters())
    precision = "bf16 autocast" if env.dtype else "fp32"
    strategy = "" if env.strategy == "none" else " " + env.strategy.upper()
    weights = ", ".join(f"{n}={w:g}" for n, w in run.data.weights.items())
    lines = [
        f"model: {cfg.model.preset}, {n_params / 1e6:.1f}M parameters | device {env.device} "
        f"x{env.world_size}{strategy}, {precision}",
        f"data: {run.data.raw.description} (prepared in {run.data.seconds:.0f}s)",
        f"objectives: {weights} | {run.data.streams.describe()}",
        f"global batch {run.global_batch} sequences = {cfg.optim.batch_size} x "
        f"{cfg.optim.grad_accum} accumulation x {env.world_size} processes; "
        f"block {run.model.config.seq_len} tokens; optimizer {cfg.optim.optimizer}",
    ]
    if run.resumed:
        lines.append(f"resuming from step {run.state.step}")
    elif cfg.run.init_from:
        parent = run.model.config.init_from
        lines.append(
            f"starting from {parent['path']} (weights sha256 {parent['weights_sha256'][:12]}), "
            "with a fresh optimizer"
        )
    return "\n".join(lines)
