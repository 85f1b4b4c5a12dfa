"""Named text-to-text tasks: ``--train-pairs first=a.jsonl last=b.jsonl``. The sources' task
names are checked, naming the source; each task's token is a special token of the tokenizer,
in front of its sources; each task has its own weight, metrics and decoding defaults; the API
(``lm.generate(task=...)``), the command line (``minituring generate --task``, ``evaluate``) and
``--init-from`` (new task tokens extend the parent's vocabulary) serve them; and two tasks
trained together on the same sources are both learned, each answering with its own skill."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_FLAGS, metrics

import model as api
import train
from data.batching import MaskedLMStream, MixtureLoader, Seq2SeqStream
from data.config import DataConfig
from data.objectives import objective_index
from data.tasks import TaskError, check_eval_tasks, pair_tasks
from model.config import MiniTuringConfig
from model.tokenizer import (
    SpecialIds,
    check_compatible,
    load_tokenizer,
    model_config,
    special_ids,
    task_ids,
    task_token,
    with_task_tokens,
)
from model.transformer import MiniTuringModel
from trainer.cli import main as cli
from trainer.config import TrainConfig, check_config, parse_objectives
from trainer.errors import TrainingError
from trainer.evaluate import selection_metric
from trainer.init_from import INHERITED_FIELDS, extended, start_from_parent

pytestmark = pytest.mark.usefixtures("without_plot")

WORDS = (
    "apple river stone cloud maple tiger piano candle forest silver rocket garden violet "
    "harbor meadow falcon copper lantern orchid summit basket mirror thunder pepper castle "
    "willow ember glacier parrot velvet"
).split()
SKILLS = {"first": lambda doc: doc.split()[0], "last": lambda doc: doc.split()[-1]}


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 7))) for _ in range(n)]


def write_tasks(folder: Path, docs: list[str], names=("first", "last")) -> dict[str, Path]:
    """One jsonl of (document, answer) pairs per task, on the same documents."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in names:
        files[name] = folder / f"{name}.jsonl"
        with open(files[name], "w") as f:
            for doc in docs:
                f.write(json.dumps({"document": doc, "summary": SKILLS[name](doc)}) + "\n")
    return files


# A small model that learns both tasks in a few hundred steps on a CPU.
MODEL = [
    "--hidden-size", "48", "--num-layers", "2", "--num-heads", "2", "--ffn-size", "96",
    "--seq-len", "16", "--max-positions", "64", "--source-len", "16", "--target-len", "4",
    "--vocab-size", "512", "--batch-size", "32", "--warmup-steps", "20", "--lr", "3e-3",
    "--pad-multiple", "8", "--source-mask-rate", "0", "--log-every", "25", "--eval-batches",
    "1", "--rouge-samples", "8", "--no-progress", "--device", "cpu", "--precision", "fp32",
]  # fmt: skip


def two_task_run(folder: Path, steps: int, *extra: str) -> Path:
    files = write_tasks(folder / "data", documents(1000, seed=0))
    out = folder / "run"
    sources = [f"{name}={path}" for name, path in files.items()]
    train.main([*MODEL, "--train-pairs", *sources, "--max-steps", str(steps),
                "--output-dir", str(out), *extra])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """A few steps of two tasks: what the run folder, the API and the commands hold."""
    return two_task_run(tmp_path_factory.mktemp("tasks"), 6, "--eval-every", "3")


# ---------------------------------------------------------------------------- sources


def test_sources_name_their_task_and_unnamed_ones_stay_summarize(tmp_path):
    assert pair_tasks(["a.jsonl", "b.jsonl"]) == {"summarize": ["a.jsonl", "b.jsonl"]}
    got = pair_tasks(["title=t.jsonl", "summarize=s.jsonl", "qa_2=q"])
    assert got == {"title": ["t.jsonl"], "summarize": ["s.jsonl"], "qa_2": ["q"]}
    assert pair_tasks(["pairs.jsonl", "title=t.jsonl"]) == {
        "summarize": ["pairs.jsonl"],
        "title": ["t.jsonl"],
    }
    # A file whose name holds "=" is a source without a task name.
    odd = tmp_path / "x=1.jsonl"
    odd.write_text("")
    assert pair_tasks([str(odd)]) == {"summarize": [str(odd)]}


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        (["Title=t.jsonl"], ["Title=t.jsonl", "not a task name"]),
        (["1st=t.jsonl"], ["1st=t.jsonl", "not a task name"]),
        (["ti-tle=t.jsonl"], ["ti-tle=t.jsonl", "not a task name"]),
        (["masked_lm=t.jsonl"], ["masked_lm=t.jsonl", "self-supervised objective"]),
        (["gap_summary=t.jsonl"], ["gap_summary=t.jsonl", "self-supervised objective"]),
        (["title=a.jsonl", "title=b.jsonl"], ["title=b.jsonl", "named twice", "title=a.jsonl"]),
        (["a.jsonl", "summarize=b.jsonl"], ["summarize=b.jsonl", "named twice", "a.jsonl"]),
        (["summarize=b.jsonl", "a.jsonl"], ["--train-pairs a.jsonl", "summarize=b.jsonl"]),
        (["title="], ["title=", "no source"]),
    ],
)
def test_bad_task_names_are_refused_naming_the_source(specs, expected):
    with pytest.raises(TaskError) as err:
        pair_tasks(specs)
    for part in expected:
        assert part in str(err.value)


def test_eval_sources_and_objectives_must_name_a_trained_task(tmp_path):
    train_tasks = pair_tasks(["title=t.jsonl"])
    assert check_eval_tasks(train_tasks, ["title=h.jsonl", "held.jsonl"]) == {
        "title": ["h.jsonl"],
        "summarize": ["held.jsonl"],
    }
    with pytest.raises(TaskError, match="--eval-pairs answer=a.jsonl: task answer has no"):
        check_eval_tasks(train_tasks, ["answer=a.jsonl"])
    assert parse_objectives("summarize=1,title=0.5,masked_lm=0.25", None, ["title"]) == {
        "summarize": 1.0,
        "title": 0.5,
        "masked_lm": 0.25,
    }
    with pytest.raises(ValueError, match="unknown objective 'answer'.*title"):
        parse_objectives("answer=1", None, ["title"])
    with pytest.raises(ValueError, match=r"objective title needs pairs \(--train-pairs title="):
        parse_objectives("title=1", ["masked_lm"])
    # auto: weight 1 for every task, masked LM a quarter, as with summarize alone.
    auto = parse_objectives("auto", ["masked_lm", "gap_summary", "summarize", "title"])
    assert auto == {"masked_lm": 0.25, "summarize": 1.0, "title": 1.0}
    # Refused before any data is read, by train.py, naming the source.
    cfg = TrainConfig()
    cfg.data.train_pairs = ["gap_summary=g.jsonl"]
    with pytest.raises(TrainingError, match="--train-pairs gap_summary=g.jsonl"):
        check_config(cfg)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="task first is named twice"):
        train.main([*TINY_FLAGS, "--train-pairs", "first=a", "first=b", "--output-dir", str(out)])


def test_the_kept_weights_are_chosen_by_the_tasks_rouge():
    some = [1]
    assert selection_metric({"summarize": some, "masked_lm": some}, 8) == ("summarize/rougeL", True)
    assert selection_metric({"title": some, "masked_lm": some}, 8) == ("title/rougeL", True)
    assert selection_metric({"summarize": some, "title": some}, 8) == ("tasks/rougeL", True)
    assert selection_metric({"title": some, "answer": some}, 0) == ("title/loss", False)


def test_each_task_draws_with_its_own_weight_and_its_own_random_stream():
    ids = special_ids_for_test()
    pairs = [[10, 11, 12]] * 40, [[13]] * 40
    streams = {
        name: Seq2SeqStream(name, *pairs, ids, source_len=8, target_len=4, task_id=task)
        for name, task in (("summarize", None), ("title", 20), ("answer", 21))
    }
    weights = {"title": 0.5, "summarize": 1.0, "answer": 0.5}
    loader = MixtureLoader(streams, weights, 4, seed=0)
    assert loader.names == ["summarize", "answer", "title"]  # built-in first, then by name
    drawn = [loader.next_batch()[0] for _ in range(400)]
    share = {n: drawn.count(n) / len(drawn) for n in loader.names}
    assert share["summarize"] == pytest.approx(0.5, abs=0.08)
    assert share["title"] == pytest.approx(0.25, abs=0.08)
    assert objective_index("summarize") == 2
    assert objective_index("title") == objective_index("title") > 2
    assert objective_index("title") != objective_index("answer")


def special_ids_for_test() -> SpecialIds:
    return SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, sentence_mask=5)


# ---------------------------------------------------------------------------- tokens


def test_task_tokens_are_special_and_stand_in_front_of_the_source(tokenizer):
    assert with_task_tokens(tokenizer, []) is tokenizer  # no named task: the same tokenizer
    assert with_task_tokens(tokenizer, ["summarize"]) is tokenizer  # summarize has none
    tok = with_task_tokens(tokenizer, ["title", "answer"])
    n = len(tokenizer)
    assert task_ids(tok) == {"title": n, "answer": n + 1} and len(tok) == n + 2
    assert task_ids(with_task_tokens(tok, ["title", "more"])) == {
        "title": n,
        "answer": n + 1,
        "more": n + 2,
    }
    # The ordinary vocabulary is untouched; the token is one id, and decoding leaves it out.
    assert tok("a title of a text")["input_ids"] == tokenizer("a title of a text")["input_ids"]
    ids = tok(f"{task_token('title')} a text", add_special_tokens=False)["input_ids"]
    assert ids[0] == n and tok.decode(ids, skip_special_tokens=True).strip() == "a text"

    src = tok("one two three four five", add_special_tokens=False)["input_ids"]
    tgt = tok("one", add_special_tokens=False)["input_ids"]
    masker = MaskedLMStream.from_tokenizer(np.zeros(0, np.int64), 16, tok, DataConfig().masking())
    masker.masking.rate = 0.9  # mask nearly every word: never the task token
    stream = Seq2SeqStream(
        "title", [src] * 8, [tgt] * 8, special_ids(tok), source_len=6, target_len=4,
        source_masker=masker, task_id=n,
    )  # fmt: skip
    ids, labels, prefix = stream.example(0)
    assert ids[:2].tolist() == [tok.cls_token_id, n] and ids[prefix - 1] == tok.sep_token_id
    assert prefix == 6  # [CLS] [TASK:title] + 3 source tokens + [SEP]: the source length
    batch = stream.batch(np.arange(8), np.arange(8), seed=0)
    assert (batch["input_ids"][:, 1] == n).all() and (batch["labels"][:, :2] == -100).all()
    assert n not in masker.random_pool and n in masker.never_masked


def test_the_run_folder_holds_each_task(short_run):
    tok = load_tokenizer(short_run)
    tasks = task_ids(tok)
    assert list(tasks) == ["first", "last"]
    assert min(tasks.values()) == len(tok) - 2  # appended after the trained vocabulary
    config = MiniTuringConfig.from_pretrained(short_run)
    assert config.task_tokens == tasks
    check_compatible(tok, config)
    config.task_tokens = {"first": tasks["first"]}
    with pytest.raises(ValueError, match="task_tokens"):
        check_compatible(tok, config)
    # Per-task decoding defaults, from each task's targets (one word and the end token).
    generation = json.loads((short_run / "generation_config.json").read_text())
    assert set(generation["tasks"]) == {"first", "last"}
    for options in generation["tasks"].values():
        assert options["max_new_tokens"] <= 3 and options["min_new_tokens"] == 1
    # Per-task loss columns and held-out metrics, ROUGE included, and the tasks' mean. (Every
    # answer is one of a few words, so no validation pair is left: its answer trains.)
    records = metrics(short_run)
    keys = {k for r in records for k in r}
    for name in ("first", "last"):
        assert {f"loss/{name}", f"eval/{name}/loss", f"eval/{name}/rougeL"} <= keys
        assert f"eval/{name}/token_accuracy" in keys
    assert "eval/tasks/rougeL" in keys
    samples = json.loads((short_run / "samples.json").read_text())
    assert set(samples["tasks"]) == {"first", "last"}


def test_api_and_commands_take_a_task(short_run, tmp_path, capsys):
    lm = api.load(short_run)
    assert lm.tasks == ["summarize", "first", "last"]
    docs = documents(3, seed=5)
    out = lm.generate(docs, task="first")
    assert isinstance(out, list) and len(out) == 3
    assert (
        lm.generate(docs[0], task="last", num_beams=1)
        == lm.generate([docs[0]], task="last", num_beams=1)[0]
    )
    assert lm.generation_for("first")["max_new_tokens"] <= 3
    with pytest.raises(ValueError, match="unknown task 'title'.*summarize, first, last"):
        lm.generate(docs, task="title")

    file = tmp_path / "docs.txt"
    file.write_text("\n".join(docs) + "\n")
    assert cli(["generate", str(short_run), str(file), "--task", "last", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p["output"] for p in printed] == lm.generate(docs, task="last")
    assert cli(["generate", str(short_run), str(file), "--task", "title"]) == 1
    assert "--task title" in capsys.readouterr().err

    held = write_tasks(tmp_path / "held", documents(6, seed=9))
    report_file = tmp_path / "eval.json"
    args = ["evaluate", str(short_run), "--pairs", f"first={held['first']}",
            f"last={held['last']}", "--output", str(report_file)]  # fmt: skip
    assert cli(args) == 0
    report = json.loads(report_file.read_text())
    for name in ("first", "last"):
        assert {f"{name}/rougeL", f"{name}/loss", f"{name}/lead_rougeL"} <= report["metrics"].keys()
        assert report["examples"][f"{name}/rouge"] == 6
    assert "tasks/rougeL" in report["metrics"]
    assert cli(["evaluate", str(short_run), "--pairs", f"title={held['first']}"]) == 1
    assert "has no task title" in capsys.readouterr().err


# ---------------------------------------------------------------------------- init-from


def test_init_from_extends_the_vocabulary_with_new_task_tokens(short_run, tmp_path):
    parent_tok = load_tokenizer(short_run)
    child_tok = with_task_tokens(parent_tok, ["first", "last", "middle"])
    assert task_ids(child_tok)["middle"] == len(parent_tok)
    saved = MiniTuringConfig.from_pretrained(short_run)
    # The parent's architecture; the vocabulary is the child's tokenizer's.
    vocab = ("vocab_size", "tokenizer_size")
    fields = {k: getattr(saved, k) for k in INHERITED_FIELDS if k not in vocab}
    child = MiniTuringModel(model_config(child_tok, **fields))
    start_from_parent(child, short_run, child_tok)
    parent = api.load(short_run).model
    rows = parent.embed.weight
    new = child.embed.weight[len(parent_tok)]
    ordinary = [i for i in range(len(parent_tok) - 2) if i not in special_ids(parent_tok).as_list()]
    torch.testing.assert_close(new, rows[ordinary].mean(0))
    torch.testing.assert_close(child.embed.weight[: len(parent_tok)], rows[: len(parent_tok)])
    for (name, a), (_, b) in zip(parent.named_parameters(), child.named_parameters(), strict=True):
        if name != "embed.weight":
            torch.testing.assert_close(a, b)

    # Across a multiple of 64: the embedding gains rows (the parent's kept, the task's the mean).
    small = MiniTuringConfig(vocab_size=64, tokenizer_size=64, hidden_size=4, num_layers=1,
                             num_heads=1, ffn_size=4)  # fmt: skip
    grown = MiniTuringModel(MiniTuringConfig(vocab_size=128, tokenizer_size=65, hidden_size=4,
                                             num_layers=1, num_heads=1, ffn_size=4))  # fmt: skip
    embedding = torch.randn(64, 4)
    out = extended(embedding, grown, small, {"title": 64}, tmp_path)
    assert out.shape == (128, 4) and torch.equal(out[:64], embedding)
    torch.testing.assert_close(out[64], embedding[6:].mean(0))

    # A whole child run adding a task: its folder loads, its checks hold.
    files = write_tasks(tmp_path / "data", documents(300, seed=3))
    third = tmp_path / "data" / "middle.jsonl"
    third.write_text(files["first"].read_text())
    out = tmp_path / "child"
    train.main(["--init-from", str(short_run), "--train-pairs", f"first={files['first']}",
                f"middle={third}", "--max-steps", "2", "--batch-size", "8", "--eval-every", "0",
                "--rouge-samples", "0", "--no-progress", "--device", "cpu", "--precision",
                "fp32", "--output-dir", str(out)])  # fmt: skip
    lm = api.load(out)
    assert lm.tasks == ["summarize", "first", "last", "middle"]
    assert task_ids(lm.tokenizer) == task_ids(child_tok)
    assert len(lm.generate(documents(2, seed=4), task="middle")) == 2


# ---------------------------------------------------------------------------- learning


def test_two_tasks_on_the_same_sources_are_both_learned(tmp_path):
    """Copy the first word, copy the last word: the same documents, two skills, one model.
    Each task, asked by its token, answers with its own skill on held-out documents."""
    run = two_task_run(tmp_path, 300, "--eval-every", "0", "--rouge-samples", "0")
    lm = api.load(run)
    held = [d for d in documents(300, seed=1) if d.split()[0] != d.split()[-1]][:100]
    answers = {name: lm.generate(held, task=name) for name in SKILLS}
    for name, skill in SKILLS.items():
        exact = np.mean([a == skill(d) for a, d in zip(answers[name], held, strict=True)])
        assert exact >= 0.95, (name, exact)
    other = {"first": SKILLS["last"], "last": SKILLS["first"]}
    for name in SKILLS:
        wrong_skill = np.mean(
            [a == other[name](d) for a, d in zip(answers[name], held, strict=True)]
        )
        assert wrong_skill <= 0.05, name
