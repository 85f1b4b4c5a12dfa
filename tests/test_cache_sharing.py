"""A cache that several runs share: one builder per entry (the others wait for it, then reuse
the entry), and an entry whose files do not match what done.json records of them (size,
checksum) is never trusted, but rebuilt, or else the run stops saying what to delete."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY_FLAGS, write_corpus

from data import cache as cache_module
from data import raw as raw_module
from data.cache import DONE, CacheDir, CacheError, file_checksum, file_record
from data.config import DataConfig
from data.corpus import Corpus
from data.pipeline import build_streams
from data.raw import load_raw
from data.vocab import train_tokenizer

OBJECTIVES = ["masked_lm", "gap_summary", "summarize"]

# Each process waits for all of them to arrive, then trains; every build of a cache entry is
# logged and lasts at least half a second, so that the processes meet on a cold cache.
RUNNER = """
import os, sys, time
from pathlib import Path
from data import cache

build = cache.CacheDir.build

def logged(self, meta=None):
    with open(os.environ["BUILD_LOG"], "a") as f:
        f.write(self.name + "\\n")
    time.sleep(0.5)
    return build(self, meta)

cache.CacheDir.build = logged
gate, count = Path(os.environ["GATE"]), int(os.environ["PROCESSES"])
(gate / f"{os.getpid()}").touch()
while len(list(gate.iterdir())) < count:
    time.sleep(0.01)
import train
train.main(sys.argv[1:])
"""


def _runner_env(tmp_path: Path, processes: int) -> dict:
    gate = tmp_path / "gate"
    gate.mkdir()
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(
        MINITURING_CACHE=str(tmp_path / "cache"),
        BUILD_LOG=str(tmp_path / "builds.log"),
        GATE=str(gate),
        PROCESSES=str(processes),
    )
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _start_together(tmp_path: Path, launchers: list[list[str]], processes: int, texts) -> None:
    """Start every launcher at once, each a 2-step masked-LM run of the same text file into
    its own folder; all must succeed, each cache entry built once, and some process waited."""
    text_file, _ = write_corpus(tmp_path / "data", texts[:300])
    env = _runner_env(tmp_path, processes)
    runs = [
        subprocess.Popen(
            [*launcher, str(tmp_path / "runner.py"), *TINY_FLAGS, "--max-steps", "2"]
            + ["--train-text", str(text_file), "--objectives", "masked_lm=1"]
            + ["--output-dir", str(tmp_path / f"run-{i}")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, launcher in enumerate(launchers)
    ]
    outputs = [run.communicate(timeout=240) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    for i in range(len(runs)):
        assert (tmp_path / f"run-{i}" / "model.safetensors").is_file()
    builds = (tmp_path / "builds.log").read_text().split()
    assert sorted(builds) == sorted(set(builds)), builds  # every entry built once
    assert {b.split("-")[0] for b in builds} >= {"texts", "tokenizer", "text"}
    stderr = "".join(err for _, err in outputs)
    assert "waiting for process " in stderr and "which is building the cache entry" in stderr
    prepared = tmp_path / "cache" / "prepared"
    assert not [p for p in prepared.iterdir() if p.suffix == ".lock" or ".tmp-" in p.name]


@pytest.mark.parametrize("processes", [2, 4])
def test_runs_started_together_on_a_cold_cache_build_each_entry_once(tmp_path, texts, processes):
    _start_together(tmp_path, [[sys.executable]] * processes, processes, texts)


def test_torchrun_jobs_started_together_share_the_cache(tmp_path, texts):
    """Two 2-process torchrun jobs (gloo): each job's local rank 0 builds, and the two meet."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _start_together(tmp_path, [[*torchrun, "--nproc_per_node=2"]] * 2, 4, texts)


# ---------------------------------------------------------------------------- the lock


def _in_child(body) -> multiprocessing.Process:
    """``body()`` in a forked process (no imports to repeat)."""
    child = multiprocessing.get_context("fork").Process(target=body)
    child.start()
    return child


def test_a_dead_holders_lock_and_partial_entry_are_taken_over(tmp_path):
    """A builder killed mid-build (as by kill -9) leaves its lock file and a partial shard; the
    next process takes the lock at once, keeps the whole shard and finishes the entry."""
    cache = CacheDir(tmp_path, "entry")

    def killed() -> None:
        cache.partial.mkdir()
        (cache.partial / "shard-0").write_text("first half")
        os._exit(9)

    child = _in_child(lambda: cache.obtain(killed))
    child.join(60)
    assert child.exitcode == 9
    assert cache.lock.exists() and not cache.path.exists()

    def fill() -> None:
        with cache.build({"n": 1}) as tmp:
            (tmp / "data").write_text((cache.partial / "shard-0").read_text() + ", second half")

    assert cache.obtain(fill) == {"n": 1}
    assert (cache.path / "data").read_text() == "first half, second half"
    assert not cache.lock.exists() and not cache.partial.exists()


def test_a_waiting_process_names_the_holder_and_reuses_its_entry(tmp_path, caplog):
    cache = CacheDir(tmp_path, "entry")
    started = multiprocessing.get_context("fork").Event()

    def slow_fill() -> None:
        started.set()
        time.sleep(1)
        with cache.build({"by": os.getpid()}) as tmp:
            (tmp / "x").write_text("x")

    child = _in_child(lambda: cache.obtain(slow_fill))
    assert started.wait(60)
    with caplog.at_level(logging.WARNING, "data.cache"):
        meta = cache.obtain(lambda: pytest.fail("built twice"))
    child.join(60)
    assert meta == {"by": child.pid}
    assert f"waiting for process {child.pid} on " in caplog.text
    assert f"which is building the cache entry {cache.path}" in caplog.text


# ---------------------------------------------------------------------------- damaged entries


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(min(100, path.stat().st_size - 1))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {"truncated": _truncate, "flipped byte": _flip, "missing": Path.unlink}
# One file of each kind of entry: (entry name prefix, file).
ENTRIES = {
    "text tables": ("texts-", "train.arrow"),
    "pair tables": ("pairs-", "eval.arrow"),
    "tokenizer": ("tokenizer-", "tokenizer.json"),
    "text tokens": ("text-train-", "tokens.int32"),
    "pair tokens": ("pairs-train-", "src.int32"),
    "gap sentences": ("gaps-train-", "tgt.off"),
}


def _prepare(files) -> tuple:
    """Everything a run of every objective prepares: tables, tokenizer, token files."""
    cfg = DataConfig(train_text=[str(files[0])], train_pairs=[str(files[1])])
    raw = load_raw(cfg)
    tok = train_tokenizer(raw.train_texts + [d for d, _ in raw.train_pairs], vocab_size=400)
    streams = build_streams(raw, tok, cfg, OBJECTIVES, 32)
    return raw, tok, streams


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, texts) -> tuple[Path, tuple]:
    """A cache filled once from a small corpus, copied by each test before damaging it."""
    folder = tmp_path_factory.mktemp("pristine")
    files = write_corpus(folder / "data", texts[:200])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINITURING_CACHE", str(folder / "cache"))
        _prepare(files)
    return folder / "cache", files


def _entry(prepared: Path, prefix: str) -> Path:
    (entry,) = [p for p in prepared.iterdir() if re.fullmatch(f"{prefix}[0-9a-f]{{20}}", p.name)]
    return entry


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("kind", ENTRIES)
def test_a_damaged_entry_is_named_and_rebuilt(
    tmp_path, monkeypatch, caplog, pristine, kind, damage
):
    source, files = pristine
    shutil.copytree(source, tmp_path / "cache")
    monkeypatch.setenv("MINITURING_CACHE", str(tmp_path / "cache"))
    prefix, name = ENTRIES[kind]
    entry = _entry(tmp_path / "cache" / "prepared", prefix)
    expected = json.loads((entry / DONE).read_text())["files"][name]
    DAMAGES[damage](entry / name)
    with caplog.at_level(logging.WARNING, "data.cache"):
        _, tok, streams = _prepare(files)
    assert f"rebuilding the cache entry {entry}: {name}: expected " in caplog.text
    found = "found no file" if damage == "missing" else "found "
    assert found in caplog.text
    if damage == "flipped byte":
        assert f"expected blake2b {expected['blake2b']}, found " in caplog.text
    else:
        assert f"expected {expected['size']:,} bytes" in caplog.text
    pristine_entry = _entry(source / "prepared", prefix)
    for path in pristine_entry.iterdir():
        if path.name != DONE:
            assert (entry / path.name).read_bytes() == path.read_bytes(), path.name
    assert sum(len(s) for s in streams.train.values()) > 0 and len(tok) == 400


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_embedded_corpus_is_rebuilt(tmp_path, monkeypatch, caplog, damage):
    small = Corpus(["a text"], ["held out"], [("document", "summary")], [])
    monkeypatch.setenv("MINITURING_CACHE", str(tmp_path))
    monkeypatch.setattr(raw_module, "build_default_corpus", lambda **k: small)
    cfg = DataConfig(corpus_max_chars=1000)
    load_raw(cfg)
    entry = _entry(tmp_path / "prepared", "corpus-")
    DAMAGES[damage](entry / "train_pairs.arrow")
    with caplog.at_level(logging.WARNING, "data.cache"):
        raw = load_raw(cfg)
    assert f"rebuilding the cache entry {entry}: train_pairs.arrow: expected " in caplog.text
    assert list(raw.train_pairs) == small.train_pairs and list(raw.eval_texts) == ["held out"]


def test_done_json_records_every_files_size_and_checksum(pristine):
    source, _ = pristine
    for entry in (p for p in (source / "prepared").iterdir() if p.is_dir()):
        files = json.loads((entry / DONE).read_text())["files"]
        assert set(files) == {p.name for p in entry.iterdir()} - {DONE}
        for name, record in files.items():
            size = (entry / name).stat().st_size
            assert record == {"size": size, "blake2b": file_checksum(entry / name, size)}


def test_large_files_are_checked_by_sampled_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "WHOLE_HASH_BYTES", 1000)
    monkeypatch.setattr(cache_module, "SAMPLE_BLOCKS", 4)
    monkeypatch.setattr(cache_module, "SAMPLE_BYTES", 10)
    path = tmp_path / "big"
    np.arange(1000, dtype=np.int32).tofile(path)  # 4000 bytes: blocks at 0, 1330, 2660, 3990
    record = file_record(path)
    assert set(record) == {"size", "blake2b_sampled"}
    cache = CacheDir(tmp_path, "e")
    with cache.build() as tmp:
        shutil.copy(path, tmp / "big")
    assert cache.problem() is None
    data = bytearray((cache.path / "big").read_bytes())
    data[1335] ^= 1  # inside a sampled block
    (cache.path / "big").write_bytes(bytes(data))
    assert cache.problem().startswith("big: expected blake2b_sampled ")


def test_an_entry_that_cannot_be_removed_stops_the_run_saying_what_to_delete(
    tmp_path, monkeypatch, pristine
):
    source, files = pristine
    shutil.copytree(source, tmp_path / "cache")
    monkeypatch.setenv("MINITURING_CACHE", str(tmp_path / "cache"))
    entry = _entry(tmp_path / "cache" / "prepared", "text-train-")
    _truncate(entry / "tokens.int32")

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_module.shutil, "rmtree", read_only)
    with pytest.raises(CacheError) as err:
        _prepare(files)
    message = str(err.value)
    assert f"the cache entry {entry} is damaged (tokens.int32: expected " in message
    assert f"cannot be removed (Permission denied); delete {entry} and run again" in message


@pytest.mark.parametrize(
    "done, why",
    [
        ("{}", "records no files (written by an older version)"),  # done.json once was {}
        ('{"files": {}}', "records no metadata"),
        ('{"files": {"tokens.int32": {"size": 1', "unreadable"),
    ],
)
def test_an_entry_whose_done_json_records_nothing_to_check_is_rebuilt(
    tmp_path, monkeypatch, caplog, pristine, done, why
):
    source, files = pristine
    shutil.copytree(source, tmp_path / "cache")
    monkeypatch.setenv("MINITURING_CACHE", str(tmp_path / "cache"))
    entry = _entry(tmp_path / "cache" / "prepared", "text-train-")
    (entry / DONE).write_text(done)
    _truncate(entry / "tokens.int32")
    with caplog.at_level(logging.WARNING, "data.cache"):
        _prepare(files)
    assert f"rebuilding the cache entry {entry}: {DONE}: {why}" in caplog.text
    assert CacheDir(entry.parent, entry.name).problem() is None
