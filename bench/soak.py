"""Kill soak: a tiny run killed again and again (SIGKILL, some SIGTERM) at moments drawn from a
seeded RNG, resumed each time, must end up the same run as one never interrupted.

    python -m bench.soak --kills 100 [--procs 1|2] [--seed 0] [--steps 40] [--child]

Kills are aimed at the phases ``bench/faults.py`` announces; exit status 1 on a divergence.
``--child``: every run starts ``--init-from`` a parent trained first, never killed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT
from bench.faults import SAVE_PHASES
from trainer.plot import read_metrics

# Wall-clock fields: the only ones a resumed run may log differently.
TIMING = frozenset({"elapsed", "tokens_per_s", "data_wait"})
STATE_TIMING = frozenset({"elapsed"})
TARGETS = ("startup", "data", "step", "eval", "save", "final")
TARGET_WEIGHTS = (1, 2, 3, 2, 4, 1)
# Logging windows that straddle saves and evaluations, as in a real run.
SAVE_EVERY, EVAL_EVERY, LOG_EVERY, KEEP = 4, 6, 3, 2
PAUSE_S = 0.8  # how long a chosen part of a save is held open
PARENT_STEPS = 8  # the parent of --child, trained once and never killed


def _timeless(record: dict, timing: frozenset = TIMING) -> dict:
    return {k: v for k, v in record.items() if k not in timing}


def _same_tensors(a: dict, b: dict, what: str, tol: float | None) -> list[str]:
    import torch

    if a.keys() != b.keys():
        return [f"{what}: different tensors ({sorted(a.keys() ^ b.keys())[:5]})"]
    problems = []
    for key in a:
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{what}: {key} is {y.dtype}{list(y.shape)}, not {x.dtype}{list(x.shape)}")  # fmt: skip
            continue
        diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else "?"
        if tol is None and not torch.equal(x, y):
            problems.append(f"{what}: {key} differs (max |diff| {diff})")
        elif tol is not None and not torch.allclose(x.double(), y.double(), rtol=0, atol=tol):
            problems.append(f"{what}: {key} differs by {diff:.3g} > {tol:g}")
    return problems


def _split(obj, prefix: str = "", tensors: dict | None = None):
    """A nested structure (an optimizer state dict) without its tensors, and its tensors."""
    import torch

    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return "<tensor>", tensors
    if isinstance(obj, dict):
        return {k: _split(v, f"{prefix}/{k}", tensors)[0] for k, v in obj.items()}, tensors
    if isinstance(obj, list | tuple):
        return [_split(v, f"{prefix}/{i}", tensors)[0] for i, v in enumerate(obj)], tensors
    return obj, tensors


def compare_runs(reference: Path, run: Path, tol: float | None = None) -> list[str]:
    """What differs between two finished run folders; empty when they are the same run (tensors
    bitwise equal, or with ``tol``, equal to that absolute tolerance)."""
    import torch
    from safetensors.torch import load_file

    reference, run = Path(reference), Path(run)
    problems = []
    ma, mb = ([*read_metrics(f / "metrics.jsonl")] if (f / "metrics.jsonl").is_file() else []
              for f in (reference, run))  # fmt: skip
    if len(ma) != len(mb):
        problems.append(f"metrics.jsonl: {len(mb)} lines, the reference has {len(ma)}")
    for n, (x, y) in enumerate(zip(ma, mb, strict=False), 1):
        x, y = _timeless(x), _timeless(y)
        if x != y:
            keys = sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))
            problems.append(f"metrics.jsonl line {n} (step {x.get('step')}): {keys} differ")
            break

    def same_weights(name: str, a: Path, b: Path) -> list[str]:
        return _same_tensors(load_file(str(a / name)), load_file(str(b / name)), name, tol)

    if not (run / "model.safetensors").is_file():
        problems.append("model.safetensors is missing")
    else:
        problems += same_weights("model.safetensors", reference, run)
    pointer_a = (reference / "checkpoints" / "latest").read_text().strip()
    pointer_b = run / "checkpoints" / "latest"
    if not pointer_b.is_file() or pointer_b.read_text().strip() != pointer_a:
        problems.append(f"checkpoints/latest does not name {pointer_a}")
    else:
        ca, cb = reference / "checkpoints" / pointer_a, run / "checkpoints" / pointer_a
        problems += same_weights(f"checkpoints/{pointer_a}/model.safetensors", reference, run)
        (oa, ta), (ob, tb) = (_split(torch.load(c / "optimizer.pt", weights_only=True))
                              for c in (ca, cb))  # fmt: skip
        problems += _same_tensors(ta, tb, f"checkpoints/{pointer_a}/optimizer.pt", tol)
        if oa != ob:
            problems.append(f"checkpoints/{pointer_a}/optimizer.pt: different settings")
        sa = json.loads((ca / "state.json").read_text())
        sb = json.loads((cb / "state.json").read_text())
        if _timeless(sa, STATE_TIMING) != _timeless(sb, STATE_TIMING):
            keys = sorted(k for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k))
            problems.append(f"checkpoints/{pointer_a}/state.json: {keys} differ")
    ra, rb = (sorted(p.name for p in (f / "checkpoints").glob("step-*")) for f in (reference, run))
    if ra != rb:
        problems.append(f"checkpoints: {rb}, the reference kept {ra}")
    if (reference / "samples.json").is_file():
        if not (run / "samples.json").is_file():
            problems.append("samples.json is missing")
        elif (reference / "samples.json").read_text() != (run / "samples.json").read_text():
            problems.append("samples.json differs")
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.name.endswith(".tmp") or p.name == ".write-test")  # fmt: skip
    return problems + ([f"temporary files left: {left}"] if left else [])


def write_corpus(folder: Path) -> tuple[Path, Path]:
    """A few hundred paragraphs of the interpreter's docs, and document/summary pairs."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    texts = [" ".join(p.split()) for key in sorted(topics) for p in topics[key].split("\n\n")]
    texts = [p for p in texts if len(p.split()) >= 12][:600]
    folder.mkdir(parents=True, exist_ok=True)
    text_file, pairs = folder / "docs.txt", folder / "pairs.jsonl"
    text_file.write_text("\n".join(texts) + "\n")
    with open(pairs, "w") as f:
        for t in texts:
            first, _, rest = t.partition(". ")
            if rest and len(first.split()) >= 4:
                f.write(json.dumps({"document": rest, "summary": first + "."}) + "\n")
    return text_file, pairs


def train_flags(out: Path, corpus: tuple[Path, Path], steps: int) -> list[str]:
    text, pairs = corpus
    return [
        "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--ffn-size", "64",
        "--seq-len", "32", "--max-positions", "128", "--source-len", "64", "--target-len", "16",
        "--vocab-size", "400", "--batch-size", "8", "--warmup-steps", "5",
        "--eval-every", str(EVAL_EVERY), "--eval-batches", "2", "--rouge-samples", "2",
        "--log-every", str(LOG_EVERY), "--no-progress", "--device", "cpu", "--precision", "fp32",
        "--train-text", str(text), "--train-pairs", str(pairs), "--output-dir", str(out),
        "--max-steps", str(steps), "--save-every", str(SAVE_EVERY),
        "--keep-checkpoints", str(KEEP),
    ]  # fmt: skip


class Job:
    """One launch of the trainer (one process, or torch.distributed.run and its workers)."""

    def __init__(self, argv: list[str], work: Path, procs: int, pause: str | None = None):
        self.phase_file, self.pids = work / "phase", work / "pids"
        self.phase_file.unlink(missing_ok=True)
        shutil.rmtree(self.pids, ignore_errors=True)
        self.pids.mkdir()
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
        env.update(OMP_NUM_THREADS="1", MINITURING_CACHE=str(work / "cache"),
                   SOAK_PHASE=str(self.phase_file), SOAK_LOG=str(work / "phases.jsonl"),
                   MINITURING_PID_DIR=str(self.pids), **({"SOAK_PAUSE": f"{pause}:{PAUSE_S}"} if pause else {}))  # fmt: skip
        launcher = [sys.executable]
        if procs > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        self.log = open(work / "job.log", "a")  # noqa: SIM115
        self.log.write(f"\n$ {' '.join(argv)}\n")
        self.log.flush()
        # A session of its own: a kill reaches the launcher and every worker.
        self.proc = subprocess.Popen([*launcher, "-m", "bench.faults", *argv], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip

    def phase(self) -> str | None:
        return (self.phase_file.read_text() or None) if self.phase_file.is_file() else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int) -> None:
        """SIGKILL: the whole job; else each rank, as a scheduler would."""
        group = [f"-{self.proc.pid}"]  # a negative pid: the process group
        for pid in group if sig == signal.SIGKILL else [f.read_text() for f in self.pids.glob("rank-*.pid")]:  # fmt: skip
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), sig)

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
            self.log.close()


def phase_timings(log: Path) -> dict[str, list[float]]:
    """How long each phase lasted in a run, from the child's phase log."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    out = collections.defaultdict(list)
    for a, b in zip(lines, lines[1:], strict=False):
        out[a["phase"].split(":")[0]].append(b["t"] - a["t"])
    return dict(out)


def loadable(out: Path) -> str | None:
    """None when ``model.load`` takes the folder (or it holds no weights yet), else why not."""
    if not (out / "model.safetensors").is_file():
        return None
    import model

    try:
        lm = model.load(out)
        lm.model.state_dict()
    except Exception as err:  # noqa: BLE001 - any failure is the finding
        return f"{type(err).__name__}: {err}"
    return None


def soak(args) -> int:
    from trainer.checkpoint import Checkpointer

    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="minituring-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / "corpus")
    print(f"soak: {args.kills} kills, {args.procs} process{'es' if args.procs > 1 else ''}, "
          f"seed {args.seed}, {args.steps} steps; work folder {work}", flush=True)  # fmt: skip

    # 0. With --child, the run soaked starts from a parent trained (never killed) first.
    parent = []
    if args.child:
        parent = ["--init-from", str(work / "parent")]
        if Job(train_flags(work / "parent", corpus, PARENT_STEPS), work, args.procs).wait() != 0:
            return print(f"the parent run failed; see {work / 'job.log'}") or 2

    # 1. The reference, timed.
    reference = work / "reference"
    (work / "phases.jsonl").unlink(missing_ok=True)
    t0 = time.monotonic()
    if Job(train_flags(reference, corpus, args.steps) + parent, work, args.procs).wait() != 0:
        print(f"the reference run failed; see {work / 'job.log'}")
        return 2
    timings = phase_timings(work / "phases.jsonl")
    print(f"reference: {time.monotonic() - t0:.1f}s", flush=True)

    def span(phase: str) -> float:  # how long a kill aimed at this phase may wait
        return (max if phase != "step" else sum)(timings.get(phase) or [0.05])

    # 2. The same run, killed again and again.
    landed, sub_phases = collections.Counter(), collections.Counter()
    kills = terms = resumes = fresh = rounds = in_save_tmp = 0
    load_failures, divergences = [], []
    out, finished = None, True
    while kills < args.kills or not finished:
        if finished:
            rounds += 1
            out, finished = work / f"round-{rounds}", False
        if out.exists() and Checkpointer(out, KEEP).latest() is not None:
            argv, resumes = ["--resume", str(out)], resumes + 1
        else:
            argv, fresh = train_flags(out, corpus, args.steps) + parent, fresh + 1
        aimed = kills < args.kills  # else kills spent: let it finish
        if aimed:
            sig = signal.SIGTERM if rng.random() < 0.15 else signal.SIGKILL
            target = "step" if sig == signal.SIGTERM else rng.choices(TARGETS, TARGET_WEIGHTS)[0]
            pause = rng.choice(SAVE_PHASES) if target == "save" else None
            delay = rng.uniform(0, PAUSE_S * 0.6 if target == "save" else span(target))
        job = Job(argv, work, args.procs, pause=pause if aimed else None)
        if aimed:  # wait for the aimed-at phase (from the start, for startup), then the delay
            while job.alive() and target != "startup" and job.phase() != (pause or target):
                time.sleep(0.002)
            deadline = time.monotonic() + delay
            while job.alive() and time.monotonic() < deadline:
                time.sleep(0.002)
        if aimed and job.alive():
            phase, tmp = job.phase(), any((out / "checkpoints").glob(".step-*.tmp"))
            job.kill(sig)
            finished = job.wait() == 0  # a SIGTERM at the very end: the run completed
            kills, terms, in_save_tmp = kills + 1, terms + (sig == signal.SIGTERM), in_save_tmp + tmp  # fmt: skip
            where = "startup" if phase is None else "save" if phase.startswith("save:") else phase
            landed[where] += 1
            sub_phases[phase] += where == "save"
        else:
            if (rc := job.wait()) != 0:
                print(f"round {rounds}: an attempt failed by itself ({rc}); see {work / 'job.log'}")  # fmt: skip
                return 2
            finished = True
        if problem := loadable(out):
            load_failures.append(f"round {rounds}, after kill {kills}: {problem}")
        if finished:
            found = compare_runs(reference, out)
            divergences += [f"round {rounds}: {p}" for p in found]
            print(f"round {rounds}: finished after {kills} kills so far; "
                  + (f"{len(found)} differences" if found else "same as the reference"), flush=True)  # fmt: skip

    # 3. The verdict.
    print(f"kills: {kills} ({kills - terms} SIGKILL, {terms} SIGTERM) over {rounds} round(s)")
    print("landed: " + ", ".join(f"{p} {landed.get(p, 0)}" for p in TARGETS)
          + f" (with a .step-*.tmp folder present: {in_save_tmp})")  # fmt: skip
    print("in a save: " + ", ".join(f"{p[5:]} {sub_phases.get(p, 0)}" for p in SAVE_PHASES))
    print(f"restarts: {resumes} with --resume, {fresh} fresh (first attempts included)")
    for line in load_failures + divergences:
        print(f"  {line}")
    ok = not load_failures and not divergences
    print(f"verdict: {'PASS' if ok else 'FAIL'}: {rounds} round(s) compared bitwise with the "
          f"reference; {len(load_failures)} unloadable folder states, {len(divergences)} divergences")  # fmt: skip
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--kills", type=int, default=100, help="kills in all (default: 100)")
    add("--procs", type=int, choices=(1, 2), default=1, help="training processes")
    add("--seed", type=int, default=0, help="seed of the kill schedule")
    add("--steps", type=int, default=40, help="steps of the run (default: 40)")
    add("--child", action="store_true", help="soak a run started with --init-from a parent")
    add("--workdir", help="folder for the runs (default: a new temporary one)")
    args = parser.parse_args(argv)
    if args.kills < 0 or args.steps < 2:
        parser.error("--kills must be >= 0 and --steps >= 2")
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
