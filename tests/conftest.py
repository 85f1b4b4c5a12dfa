"""Shared tiny fixtures: a few hundred documents from the interpreter's own docs, a small
tokenizer, a 2-layer model, and one tiny trained run folder for the API tests."""

from __future__ import annotations

import json
import os
import pydoc_data.topics
from pathlib import Path

import pytest
import torch

from trainer.plot import read_metrics

TINY_FLAGS = [
    "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--ffn-size", "64",
    "--seq-len", "32", "--max-positions", "128", "--source-len", "64", "--target-len", "16",
    "--vocab-size", "400", "--batch-size", "8", "--warmup-steps", "5",
    "--eval-every", "0", "--eval-batches", "2", "--rouge-samples", "4",
    "--log-every", "5", "--no-progress", "--device", "cpu", "--precision", "fp32",
]  # fmt: skip


# The repository: the working directory of the tests' subprocesses.
ROOT = Path(__file__).resolve().parents[1]

# Every objective, so that the tests train each (--objectives auto leaves gap_summary out with
# 2,000 pairs or more); a test's own --objectives, given later, wins.
ALL_OBJECTIVES = ["--objectives", "masked_lm=1,gap_summary=1,summarize=1"]


def train_flags(out: Path, corpus_files, *extra: str) -> list[str]:
    """A tiny run of every objective on the test corpus (its text and its pairs) into ``out``."""
    text_file, pairs = corpus_files
    data = ["--train-text", str(text_file), "--train-pairs", str(pairs)]
    return TINY_FLAGS + data + ALL_OBJECTIVES + ["--output-dir", str(out), *extra]


def metrics(folder: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return read_metrics(Path(folder) / "metrics.jsonl")


def latest_step(folder: Path) -> int:
    """The step of a run's latest complete checkpoint."""
    name = (Path(folder) / "checkpoints" / "latest").read_text().strip()
    return json.loads((Path(folder) / "checkpoints" / name / "state.json").read_text())["step"]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Never write into the user's cache from tests."""
    os.environ["MINITURING_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    # The test models are tiny (width 32): one thread beats two, and never oversubscribes a
    # busy machine.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def without_plot():
    """Leave out the end-of-run plot: most of a tiny run's time, and not what most tests
    check (the plot has its own tests)."""
    from trainer import loop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "write_training_curves", lambda folder, **_: None)
        yield


def paragraphs() -> list[str]:
    out = []
    for key in sorted(pydoc_data.topics.topics):
        for p in pydoc_data.topics.topics[key].split("\n\n"):
            p = " ".join(p.split())
            if len(p.split()) >= 12:
                out.append(p)
    return out


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return paragraphs()[:600]


@pytest.fixture(scope="session")
def tokenizer(texts):
    from data.vocab import train_tokenizer

    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture
def tiny_config(tokenizer):
    from model.tokenizer import model_config

    return model_config(
        tokenizer,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        ffn_size=64,
        max_position_embeddings=128,
    )


def write_corpus(folder: Path, texts: list[str]) -> tuple[Path, Path]:
    """A text file (one document per line) and a jsonl of document/summary pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    text_file = folder / "docs.txt"
    text_file.write_text("\n".join(texts) + "\n")
    pairs = folder / "pairs.jsonl"
    with open(pairs, "w") as f:
        for t in texts:
            first, _, rest = t.partition(". ")
            if rest and len(first.split()) >= 4:
                f.write(json.dumps({"document": rest, "summary": first + "."}) + "\n")
    return text_file, pairs


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory, texts):
    return write_corpus(tmp_path_factory.mktemp("corpus"), texts)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, texts):
    """Training text of a few passes' worth for a 12-step streamed run (about 10 micro-batches
    of 8 blocks a pass), and separate held-out text."""
    folder = tmp_path_factory.mktemp("stream-corpus")
    train_file, _ = write_corpus(folder / "train", texts[:16])
    eval_file, _ = write_corpus(folder / "eval", texts[500:540])
    return train_file, eval_file


@pytest.fixture
def short_rows(monkeypatch):
    """The last block's queries rounded up to a multiple of 8 instead of
    ``model.losses.QUERY_MULTIPLE``: test batches of 20-30 positions then take the sparse path
    (the last block at the labelled positions only) that the tests compare with the dense one."""
    import model.losses

    monkeypatch.setattr(model.losses, "QUERY_MULTIPLE", 8)


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory, corpus_files) -> Path:
    """A run folder of two steps with a learned table of 128 positions (``--position learned``,
    the architecture of folders from before rotary positions): inputs past it are refused."""
    import train

    out = tmp_path_factory.mktemp("runs") / "learned"
    flags = train_flags(out, corpus_files, "--position", "learned", "--max-steps", "2")
    train.train(train.config_from_args(flags))
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_files) -> Path:
    """A run folder trained for a few steps with every objective."""
    import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = train.config_from_args(
        train_flags(out, corpus_files, "--max-steps", "12", "--save-every", "6")
    )
    train.train(cfg)
    return out


# The head of a script run with ``python -c`` that must find none of this project: no path to
# it, and even an installed (editable) copy of it stays out of reach, so a run folder loads
# through transformers and its own copied code alone.
WITHOUT_PROJECT = rf"""
import importlib.abc, os, sys

root = {str(ROOT)!r}
sys.path[:] = [p for p in sys.path if not (os.path.isdir(p) and os.path.samefile(p, root))]

class NoMiniTuring(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("model", "data", "train", "conftest"):
            raise ImportError(f"{{name}} is blocked in this test")

sys.meta_path.insert(0, NoMiniTuring())
"""
