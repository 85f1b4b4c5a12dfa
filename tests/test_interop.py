"""A run folder in the Hugging Face / PyTorch ecosystem: the Auto classes, pipeline("fill-mask"),
save_pretrained round trips, trust_remote_code without this package, TensorBoard event files and
the training-curves PNG."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALL_OBJECTIVES, TINY_FLAGS, WITHOUT_PROJECT
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    pipeline,
)

import model
import train
from model.hf import AUTO_MAP, REMOTE_CODE_FILES, _check_self_contained, save_remote_code
from model.tokenizer import load_tokenizer
from trainer import metrics
from trainer.errors import TrainingError
from trainer.plot import PLOT_FILE

TEXTS = [
    "Return the [MASK] value of a number.",
    "The list is [MASK] in place.",
    "Raise a [MASK] if the file does not exist.",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lm(tiny_run):
    return model.load(tiny_run)


def same_top_k(hf: list[dict], ours: list[dict]) -> None:
    assert [p["token"] for p in hf] == [p["token_id"] for p in ours]
    for a, b in zip(hf, ours, strict=True):
        assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-7)
        assert a["token_str"] == b["token"]


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 400 and height >= 300
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"


# ---------------------------------------------------------------------------- Auto classes


def test_auto_classes_return_our_classes_with_the_weights(tiny_run, lm):
    config = AutoConfig.from_pretrained(tiny_run)
    assert isinstance(config, model.MiniTuringConfig)
    assert config.hidden_size == lm.config.hidden_size and config.training == lm.config.training

    tokenizer = AutoTokenizer.from_pretrained(tiny_run)
    text = "Return the absolute value of a number."
    assert tokenizer(text)["input_ids"] == load_tokenizer(tiny_run)(text)["input_ids"]
    assert tokenizer.mask_token_id == config.mask_token_id

    weights = load_file(str(tiny_run / "model.safetensors"))
    for auto, cls in (
        (AutoModel, model.MiniTuringModel),
        (AutoModelForMaskedLM, model.MiniTuringForMaskedLM),
    ):
        loaded = auto.from_pretrained(tiny_run)
        assert type(loaded) is cls
        state = loaded.state_dict()
        assert state.keys() == weights.keys()
        assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_masked_lm_head_only_hides_impossible_tokens(tiny_run, lm):
    """The Auto masked-LM class is the same network: equal logits wherever a word can be, -inf
    at special tokens and at the embedding rows past the tokenizer."""
    mlm = AutoModelForMaskedLM.from_pretrained(tiny_run).eval()
    ids = torch.tensor(
        [lm.tokenizer(TEXTS[0].replace("[MASK]", lm.tokenizer.mask_token))["input_ids"]]
    )
    with torch.no_grad():
        theirs = mlm(ids).logits
        ours = lm.model(ids).logits
    never = mlm.never_predicted()
    expected = set(lm.tokenizer.all_special_ids) | set(
        range(len(lm.tokenizer), lm.config.vocab_size)
    )
    assert set(never.nonzero().flatten().tolist()) == expected
    assert torch.isneginf(theirs[..., never]).all()
    torch.testing.assert_close(theirs[..., ~never], ours[..., ~never])
    labels = torch.full_like(ids, -100)
    labels[0, 2] = ids[0, 2]
    with torch.no_grad():
        assert float(mlm(ids, labels=labels).loss) == pytest.approx(
            float(lm.model(ids, labels=labels).loss)
        )


def test_fill_mask_pipeline_agrees_with_fill_mask(tiny_run, lm):
    fill = pipeline("fill-mask", model=str(tiny_run), device="cpu")
    assert isinstance(fill.model, model.MiniTuringForMaskedLM)
    for text in TEXTS:
        same_top_k(fill(text, top_k=5), lm.fill_mask(text, top_k=5))
    # All the probability sits on tokens fill_mask may return, so scores are comparable.
    everything = fill(TEXTS[0], top_k=lm.config.vocab_size)
    assert sum(p["score"] for p in everything) == pytest.approx(1.0, abs=1e-4)
    special = set(lm.tokenizer.all_special_ids)
    assert not any(p["token"] in special for p in everything if p["score"] > 0)


def test_save_pretrained_round_trip_is_safetensors_only(tiny_run, tmp_path):
    mlm = AutoModelForMaskedLM.from_pretrained(tiny_run)
    mlm.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files), files
    assert {"config.py", "transformer.py"} <= files  # the code travels with the weights
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP
    again = AutoModelForMaskedLM.from_pretrained(tmp_path)
    a, b = mlm.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[2, 40, 41, 4, 42, 3]])
    with torch.no_grad():
        torch.testing.assert_close(mlm(ids).logits, again(ids).logits)


# ---------------------------------------------------------------------------- remote code


def test_run_folder_carries_its_code_and_auto_map(tiny_run):
    for source in REMOTE_CODE_FILES:
        assert filecmp.cmp(tiny_run / source.name, source, shallow=False), source.name
    assert json.loads((tiny_run / "config.json").read_text())["auto_map"] == AUTO_MAP


REMOTE_SCRIPT = (
    WITHOUT_PROJECT
    + r"""
import json

run, resaved, text = sys.argv[1:4]
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, pipeline

result = {}
try:
    AutoModelForMaskedLM.from_pretrained(run)
    result["without_trust"] = "loaded"
except Exception as err:
    result["without_trust"] = str(err)
config = AutoConfig.from_pretrained(run, trust_remote_code=True)
base = AutoModel.from_pretrained(run, trust_remote_code=True)
fill = pipeline("fill-mask", model=run, trust_remote_code=True)
again = AutoModelForMaskedLM.from_pretrained(resaved, trust_remote_code=True)
ids = [[2, 40, 41, 4, 42, 3]]
import torch
result.update(
    config=type(config).__module__ + "." + type(config).__name__,
    base=type(base).__module__ + "." + type(base).__name__,
    mlm=type(fill.model).__module__ + "." + type(fill.model).__name__,
    resaved=type(again).__module__ + "." + type(again).__name__,
    top=fill(text, top_k=5),
    resaved_logits_equal=bool(torch.equal(fill.model(torch.tensor(ids)).logits, again(torch.tensor(ids)).logits)),
    ours=sorted(k for k in sys.modules if k.split(".")[0] in ("model", "data", "train")),
)
print("RESULT " + json.dumps(result))
"""
)


def test_trust_remote_code_loads_without_this_package(tiny_run, lm, tmp_path):
    """A fresh interpreter without our packages (even if installed), offline: the folder's own
    code copies load it, the re-saved folder too, and fill-mask answers as model.load does."""
    resaved = tmp_path / "resaved"
    AutoModelForMaskedLM.from_pretrained(tiny_run).save_pretrained(resaved)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")} | {
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
    }
    out = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tiny_run), str(resaved), TEXTS[0]],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # Without trust_remote_code, transformers prompts on stdin (no newline): find the marker.
    assert "RESULT " in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["ours"] == []
    assert "trust_remote_code" in result["without_trust"]
    for key, name in (
        ("config", "config.MiniTuringConfig"),
        ("base", "transformer.MiniTuringModel"),
        ("mlm", "transformer.MiniTuringForMaskedLM"),
        ("resaved", "transformer.MiniTuringForMaskedLM"),
    ):
        assert result[key].startswith("transformers_modules.") and result[key].endswith(name)
    assert result["resaved_logits_equal"]
    same_top_k(result["top"], lm.fill_mask(TEXTS[0], top_k=5))


def test_save_remote_code_refuses_code_that_cannot_travel(tmp_path):
    bad = tmp_path / "transformer.py"
    bad.write_text("from model.config import MiniTuringConfig\n")
    with pytest.raises(RuntimeError, match="imports model.config by absolute name"):
        _check_self_contained(bad)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        save_remote_code(tmp_path)


# ---------------------------------------------------------------------------- seeing a run


def test_training_ends_with_a_png_of_the_curves(tiny_run):
    assert_png(tiny_run / PLOT_FILE)


def assert_tensorboard_matches_metrics(run: Path) -> None:
    """Every number of metrics.jsonl is in TensorBoard, at its step, once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    jsonl = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for key in sorted({k for r in jsonl for k in r} - {"step"}):
        tag = key if "/" in key else f"train/{key}"
        logged = [(r["step"], r[key]) for r in jsonl if key in r]
        written = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in written] == [s for s, _ in logged], key
        assert [v for _, v in written] == pytest.approx([v for _, v in logged], rel=1e-6), key


def test_report_to_tensorboard_writes_event_files(tmp_path, corpus_files, capsys):
    text_file, pairs = corpus_files
    out = tmp_path / "tb"
    flags = ["--train-text", str(text_file), "--train-pairs", str(pairs), "--output-dir", str(out)]
    flags += ["--max-steps", "8", "--log-every", "2", "--eval-every", "4", "--save-every", "4"]
    flags += ALL_OBJECTIVES + ["--report-to", "tensorboard"]
    train.train(train.config_from_args(TINY_FLAGS + flags))
    printed = capsys.readouterr().out
    assert "speed:" in printed and "to finish 8 steps" in printed  # the time estimate
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    jsonl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl if "lr" in r] == [2, 4, 6, 8]
    # The validation split periodically, the held-out data at the end.
    assert [r["step"] for r in jsonl if "val/masked_lm/accuracy" in r] == [4, 8]
    assert [r["step"] for r in jsonl if "eval/masked_lm/accuracy" in r] == [8]
    expected = {"loss/masked_lm", "loss/gap_summary", "loss/summarize", "lr", "tokens_per_s"}
    expected |= {"eval/masked_lm/accuracy", "eval/masked_lm/perplexity", "eval/summarize/rouge1"}
    assert expected <= {k for r in jsonl for k in r}
    assert_tensorboard_matches_metrics(out)

    # Interrupted after its step-4 checkpoint, then resumed: the events logged past the
    # checkpoint give way to the resumed run's, as the metrics.jsonl lines do.
    shutil.rmtree(out / "checkpoints" / "step-0000008")
    (out / "checkpoints" / "latest").write_text("step-0000004")
    train.train(train.config_from_args(["--resume", str(out)]))
    assert_tensorboard_matches_metrics(out)


def test_report_to_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(TrainingError, match="--report-to must be one of none, tensorboard"):
        metrics.check_report_to("wandb")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    flags = TINY_FLAGS + ["--output-dir", str(tmp_path / "x"), "--report-to", "tensorboard"]
    with pytest.raises(TrainingError, match=r'pip install -e "\.\[tensorboard\]"'):
        train.train(train.config_from_args(flags))
    assert not (tmp_path / "x").exists()  # refused before any work


def test_missing_matplotlib_costs_one_line_not_the_run(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes((tiny_run / "metrics.jsonl").read_bytes())
    metrics.write_training_curves(run)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "pip install matplotlib" in printed[0]
    assert f"minituring plot {run}" in printed[0]
    assert not (run / PLOT_FILE).exists()


def test_eta_line():
    line = metrics.eta_line(20, 10.0, 20, 1220)
    assert line.startswith("speed: 0.5 s/step over 20 steps; about 10m 00s to finish 1,220 steps")
