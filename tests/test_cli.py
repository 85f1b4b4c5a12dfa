"""``python -m trainer.cli`` / ``minituring`` on a tiny trained run: fill-mask, summarize, evaluate and
plot give what the Python API and the trainer give, and bad input gets one clear line."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from importlib import import_module

import pytest
from conftest import ROOT
from test_interop import assert_png

import model
from data.config import DataConfig
from data.raw import load_raw
from trainer.cli import build_parser, main

DOCS = [
    "The list type is a mutable sequence. Lists may be constructed in several ways.",
    "A tuple is an immutable sequence, typically used to store collections of data.",
]


@pytest.fixture(scope="module")
def lm(tiny_run):
    return model.load(tiny_run)


def python_m_model(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------- round trips


def test_fill_mask_command_matches_the_api(tiny_run, lm):
    texts = ["Return the [MASK] value of a number.", "The [MASK] is [MASK]."]
    out = python_m_model("fill-mask", str(tiny_run), *texts, "--top-k", "3", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [r["text"] for r in result] == texts
    expected = [lm.fill_mask(texts[0], top_k=3)], lm.fill_mask(texts[1], top_k=3)
    for r, masks in zip(result, expected, strict=True):
        assert len(r["masks"]) == len(masks)
        for got, want in zip(r["masks"], masks, strict=True):
            assert [p["token_id"] for p in got] == [p["token_id"] for p in want]
            assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], rel=1e-5)


def test_summarize_command_reads_stdin_and_matches_the_api(tiny_run, lm, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(DOCS) + "\n\n"))
    code, out, err = run_main(
        capsys, "summarize", str(tiny_run), "-", "--json", "--num-beams", "2",
        "--max-new-tokens", "8",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    expected = lm.summarize(DOCS, num_beams=2, max_new_tokens=8)
    assert result == [{"index": i, "summary": s} for i, s in enumerate(expected)]


def test_summarize_command_gives_an_empty_line_for_an_empty_document(tiny_run, lm):
    """Output lines match input lines: an empty input line gets an empty summary line."""
    options = ["--num-beams", "2", "--max-new-tokens", "8"]
    stdin = f"\n{DOCS[0]}\n   \n{DOCS[1]}\n\n"
    out = python_m_model("summarize", str(tiny_run), "-", *options, stdin=stdin)
    assert out.returncode == 0, out.stderr
    expected = lm.summarize(DOCS, num_beams=2, max_new_tokens=8)
    lines = out.stdout.split("\n")
    assert lines == ["", " ".join(expected[0].split()), "", " ".join(expected[1].split()), ""]
    whole = python_m_model("summarize", str(tiny_run), "-", "--split", "file", stdin=" \n ")
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout == "\n"


def test_a_reader_that_goes_away_ends_the_command_quietly(tiny_run):
    """``minituring ... | head -n 1``: no error and no traceback once head has its line;
    the status is 141 (128 + SIGPIPE), what ``cat`` or ``yes`` exit with in such a pipe."""
    texts = "\n".join(f"Return the [MASK] value of number {i}." for i in range(300))
    writer = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "fill-mask", str(tiny_run), "-", "--top-k", "50"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    head = subprocess.Popen(["head", "-n", "1"], stdin=writer.stdout, stdout=subprocess.PIPE)
    writer.stdout.close()  # head alone reads it
    writer.stdin.write(texts.encode())
    writer.stdin.close()
    first, _ = head.communicate(timeout=300)
    err = writer.stderr.read().decode()
    writer.wait(300)
    assert first.decode().startswith("Return the [MASK] value of number 0.")
    assert writer.returncode == 141, err
    assert "Traceback" not in err and "error" not in err, err


def test_summarize_file_modes_and_seeded_sampling(tiny_run, lm, tmp_path, capsys):
    file = tmp_path / "docs.txt"
    file.write_text(DOCS[0] + "\n" + DOCS[1] + "\n")
    flags = ["--do-sample", "--seed", "7", "--top-p", "0.9", "--max-new-tokens", "6", "--json"]
    code, first, _ = run_main(capsys, "summarize", str(tiny_run), str(file), *flags)
    assert code == 0
    _, second, _ = run_main(capsys, "summarize", str(tiny_run), str(file), *flags)
    assert first == second  # a seed makes sampling repeatable
    expected = lm.summarize(DOCS, do_sample=True, num_beams=1, seed=7, top_p=0.9, max_new_tokens=6)
    assert [r["summary"] for r in json.loads(first)] == expected
    code, whole, _ = run_main(
        capsys, "summarize", str(tiny_run), str(file), "--split", "file", "--num-beams", "1"
    )
    assert code == 0 and len(whole.splitlines()) == 1  # the whole file is one document
    assert whole.strip() == " ".join(lm.summarize(DOCS[0] + "\n" + DOCS[1], num_beams=1).split())


def test_evaluate_reproduces_the_trainers_held_out_numbers(
    tiny_run, corpus_files, tmp_path, capsys
):
    """The trainer's last evaluation of tiny_run, recomputed from files holding its held-out
    split, with the trainer's evaluation sizes: the same numbers."""
    text_file, pairs_file = corpus_files
    raw = load_raw(DataConfig(train_text=[str(text_file)], train_pairs=[str(pairs_file)]))
    held_text, held_pairs = tmp_path / "held.txt", tmp_path / "held.jsonl"
    held_text.write_text("".join(t + "\n" for t in raw.eval_texts))
    held_pairs.write_text(
        "".join(json.dumps({"document": d, "summary": s}) + "\n" for d, s in raw.eval_pairs)
    )
    output = tmp_path / "out" / "eval.json"
    code, printed, err = run_main(
        capsys, "evaluate", str(tiny_run), "--pairs", str(held_pairs), "--text", str(held_text),
        "--batch-size", "8", "--max-batches", "2", "--rouge-samples", "4", "--output", str(output),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(output.read_text())
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    trainer = {k.removeprefix("eval/"): v for k, v in lines[-1].items() if k.startswith("eval/")}
    assert trainer and report["metrics"].keys() == trainer.keys()
    for key, value in trainer.items():
        assert report["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # Both decode as summarize does: the run's generation_config.json.
    generation = json.loads((tiny_run / "generation_config.json").read_text())
    assert {k: report["settings"]["decoding"][k] for k in generation} == generation
    # The table: a row per objective with its loss, and the note on what accuracy means.
    rows = {line.split()[0]: line for line in printed.splitlines() if line.strip()}
    assert {"objective", "masked_lm", "gap_summary", "summarize"} <= rows.keys()
    assert "rouge1" in rows["objective"] and "perplexity" in rows["objective"]
    assert f"{trainer['masked_lm/loss']:.4g}" in rows["masked_lm"]
    assert f"written to {output}" in printed


def test_evaluation_decodes_a_few_documents_at_a_time(tiny_run, corpus_files, capsys,
                                                      monkeypatch):  # fmt: skip
    """On a CPU the evaluation decodes CPU_DECODE_BATCH documents at a time (memory): the same
    summaries, so the same ROUGE, as decoding the whole batch at once."""
    from trainer import evaluate

    _, pairs_file = corpus_files
    sizes, real = [], evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda m, s, c: sizes.append(len(s)) or real(m, s, c))
    reports = []
    for chunk in (3, 64):
        monkeypatch.setattr(evaluate, "CPU_DECODE_BATCH", chunk)
        sizes.clear()
        code, out, err = run_main(capsys, "evaluate", str(tiny_run), "--pairs", str(pairs_file),
                                  "--rouge-samples", "10", "--batch-size", "8", "--json")  # fmt: skip
        assert code == 0, err
        reports.append(json.loads(out)["metrics"])
        assert sizes == ([3, 3, 3, 1] if chunk == 3 else [8, 2])
    assert reports[0] == reports[1]


def test_evaluate_masks_at_the_rate_asked(tiny_run, corpus_files, capsys):
    """--mask-rate replaces the run's training rate (other masks, other masked-LM numbers on
    the same text); the report names the rate used; a rate outside (0, 1) is one clear line."""
    text_file, _ = corpus_files
    reports = {}
    for rate in ("0.15", "0.3"):
        code, out, err = run_main(capsys, "evaluate", str(tiny_run), "--text", str(text_file),
                                  "--max-batches", "2", "--json", "--mask-rate", rate)  # fmt: skip
        assert code == 0, err
        reports[rate] = json.loads(out)
        assert reports[rate]["settings"]["mask_rate"] == float(rate)
    low, high = (reports[r]["metrics"]["masked_lm/loss"] for r in ("0.15", "0.3"))
    assert low != high
    code, _, err = run_main(capsys, "evaluate", str(tiny_run), "--text", str(text_file),
                            "--mask-rate", "1.5")  # fmt: skip
    assert code == 1 and "--mask-rate: mask rate must be in (0, 1), got 1.5" in err


def test_plot_command_writes_a_png(tiny_run, tmp_path, capsys):
    target = tmp_path / "curves.png"
    code, printed, _ = run_main(capsys, "plot", str(tiny_run), "--output", str(target))
    assert code == 0 and printed.strip() == str(target)
    assert_png(target)


# ---------------------------------------------------------------------------- errors and help


@pytest.mark.parametrize(
    "command",
    [
        ["fill-mask", "{run}", "a [MASK]"],
        ["summarize", "{run}", "{docs}"],
        ["evaluate", "{run}", "--pairs", "{pairs}"],
        ["plot", "{run}"],
    ],
)
def test_missing_run_folder_is_one_clear_line(command, tmp_path, corpus_files, capsys):
    text_file, pairs = corpus_files
    missing = tmp_path / "no-such-run"
    args = [a.format(run=missing, docs=text_file, pairs=pairs) for a in command]
    code, out, err = run_main(capsys, *args)
    assert code == 1 and out == ""
    assert err.startswith(f"minituring {command[0]}: error: {missing} is not a folder")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_incomplete_or_mismatched_run_folder(tiny_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken, ignore=shutil.ignore_patterns("checkpoints"))
    (broken / "model.safetensors").unlink()
    code, _, err = run_main(capsys, "fill-mask", str(broken), "a [MASK]")
    assert code == 1 and "not a complete run folder: model.safetensors is missing" in err
    config = json.loads((broken / "config.json").read_text())
    config["mask_token_id"] = 7
    (broken / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny_run / "model.safetensors", broken / "model.safetensors")
    docs = tmp_path / "docs.txt"
    docs.write_text(DOCS[0] + "\n")
    code, _, err = run_main(capsys, "summarize", str(broken), str(docs))
    assert code == 1 and "mask_token_id=7" in err
    (broken / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    code, _, err = run_main(capsys, "plot", str(broken))
    assert code == 1 and "metrics.jsonl, line 2: not JSON" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["summarize", "{run}", "-", "--do-sample", "--num-beams", "3"], "not both"),
        (["summarize", "{run}", "{run}/missing.txt"], "no such file"),
        (["evaluate", "{run}"], "give --pairs FILE and/or --text FILE"),
        (["fill-mask", "{run}", "no mask here"], "no [MASK] to fill"),
        (["fill-mask", "{run}", "a [MASK]", "--device", "cuda:7"], "CUDA"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_run, args, message, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(DOCS[0]))
    code, _, err = run_main(capsys, *[a.format(run=tiny_run) for a in args])
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "command, options",
    [
        ("fill-mask", ["--top-k", "--json", "--device"]),
        ("summarize", ["--split", "--num-beams", "--max-new-tokens", "--length-penalty",
                       "--no-repeat-ngram-size", "--do-sample", "--top-k", "--top-p",
                       "--temperature", "--seed", "--json"]),
        ("evaluate", ["--pairs", "--text", "--output", "--json", "--rouge-samples", "--mask-rate"]),
        ("plot", ["--output"]),
    ],
)  # fmt: skip
def test_every_command_has_help(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser("minituring").parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: minituring {command} ") and "example: minituring" in text
    assert all(option in text for option in options), [o for o in options if o not in text]


def test_console_scripts_point_at_real_functions():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"minituring-train": "train:main", "minituring": "trainer.cli:main"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(import_module(module), name))
