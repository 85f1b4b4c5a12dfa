"""The Python inference API on a tiny trained run folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import model
from model.api import RunFolderError


@pytest.fixture(scope="module")
def lm(tiny_run):
    return model.load(tiny_run)


def test_fill_mask_one_mask(lm):
    out = lm.fill_mask("Return the [MASK] value of a number.", top_k=5)
    assert isinstance(out, list) and len(out) == 5
    assert set(out[0]) >= {"token", "score", "sequence", "token_id"}
    scores = [p["score"] for p in out]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert all("[MASK]" not in p["sequence"] for p in out)
    assert all(p["sequence"].startswith("Return the") for p in out)
    special = set(lm.tokenizer.all_special_ids)
    assert not any(p["token_id"] in special for p in out)


def test_fill_mask_several_masks_and_texts(lm):
    two = lm.fill_mask("The [MASK] is [MASK].", top_k=3)
    assert len(two) == 2 and all(len(options) == 3 for options in two)
    batch = lm.fill_mask(
        ["a [MASK] b", "A much longer text with a [MASK] in the middle of it all."], top_k=2
    )
    assert len(batch) == 2 and len(batch[0]) == 2
    # A batch of mixed lengths gives the same answers as one text at a time.
    alone = lm.fill_mask("A much longer text with a [MASK] in the middle of it all.", top_k=2)
    assert [p["token_id"] for p in batch[1]] == [p["token_id"] for p in alone]
    assert batch[1][0]["score"] == pytest.approx(alone[0]["score"], rel=1e-4)


def test_fill_mask_bad_inputs(lm):
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        lm.fill_mask("")
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        lm.fill_mask("nothing to fill here")
    with pytest.raises(TypeError):
        lm.fill_mask(42)


def test_fill_mask_past_a_learned_position_table(learned_run, lm):
    """A learned table of 128 positions refuses a longer text; rotary positions read it."""
    text = "word " * 500 + "[MASK]"
    with pytest.raises(ValueError, match="reads at most"):
        model.load(learned_run).fill_mask(text)
    assert lm.model.config.position == "rope" and len(lm.fill_mask(text)) == 5


def test_summarize_str_and_list(lm):
    doc = "The list type is a mutable sequence. Lists may be constructed in several ways. " * 3
    out = lm.summarize(doc, max_new_tokens=8, num_beams=2)
    assert isinstance(out, str)
    many = lm.summarize([doc, "Short one.", ""], max_new_tokens=8, num_beams=1)
    assert isinstance(many, list) and len(many) == 3
    assert many[0] == lm.summarize(doc, max_new_tokens=8, num_beams=1)
    long = lm.summarize("word " * 5000, max_new_tokens=4, num_beams=1)  # truncated, not an error
    assert isinstance(long, str)
    sampled = lm.summarize(doc, max_new_tokens=8, do_sample=True, top_p=0.9, seed=3)  # 1 beam
    assert sampled == lm.summarize(
        doc, max_new_tokens=8, num_beams=1, do_sample=True, top_p=0.9, seed=3
    )


def test_summarize_empty_documents_give_empty_summaries_without_the_model(lm, monkeypatch):
    doc = "The list type is a mutable sequence. Lists may be constructed in several ways."
    expected = lm.summarize([doc, "Short one."], max_new_tokens=8, num_beams=2)
    sources = []
    real = model.api.generate

    def counting(net, batch, cfg, generator=None):
        sources.extend(batch)
        return real(net, batch, cfg, generator)

    monkeypatch.setattr(model.api, "generate", counting)
    assert lm.summarize("") == ""
    assert lm.summarize(" \n\t ") == ""
    assert lm.summarize(["", "  "]) == ["", ""]
    assert sources == []  # the model never ran
    mixed = ["", doc, " ", "Short one.", ""]
    assert lm.summarize(mixed, max_new_tokens=8, num_beams=2, batch_size=1) == [
        "", expected[0], "", expected[1], ""
    ]  # fmt: skip
    assert len(sources) == 2


def test_fill_mask_without_a_mask_is_a_clear_error_in_a_list_too(lm):
    with pytest.raises(ValueError, match="text 1 has no \\[MASK\\] to fill"):
        lm.fill_mask(["a [MASK] b", ""])


def test_summarize_bad_options(lm):
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.summarize("text", max_new_tokens=0)
    with pytest.raises(ValueError, match="not both"):
        lm.summarize("text", do_sample=True, num_beams=2)


def test_load_refuses_incomplete_or_inconsistent_folders(tmp_path, tiny_run):
    with pytest.raises(RunFolderError, match="not a folder"):
        model.load(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(RunFolderError, match="model.safetensors is missing"):
        model.load(broken)

    mismatch = tmp_path / "mismatch"
    shutil.copytree(tiny_run, mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["hidden_size"] = 64
    config["num_heads"] = 2
    (mismatch / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunFolderError, match="shape"):
        model.load(mismatch)

    vocab = tmp_path / "vocab"
    shutil.copytree(tiny_run, vocab)
    config = json.loads((vocab / "config.json").read_text())
    config["mask_token_id"] = 1
    (vocab / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunFolderError, match="mask_token_id"):
        model.load(vocab)


def test_load_refuses_a_pickle_in_place_of_weights(tmp_path, tiny_run):
    evil = tmp_path / "evil"
    shutil.copytree(tiny_run, evil)
    torch.save({"x": torch.zeros(1)}, evil / "model.safetensors")  # a pickle, not safetensors
    with pytest.raises(RunFolderError, match="not a valid safetensors file"):
        model.load(evil)


def test_load_on_a_device_argument(tiny_run):
    lm = model.load(tiny_run, device="cpu")
    assert lm.device.type == "cpu"
    weights = load_file(str(tiny_run / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in lm.model.state_dict().items())


def test_the_run_writes_its_decoding_defaults_from_its_data(tiny_run, corpus_files):
    """generation_config.json: Hugging Face's file, with lengths from the training summaries."""
    from transformers import GenerationConfig

    saved = json.loads((tiny_run / "generation_config.json").read_text())
    target_len = json.loads((tiny_run / "config.json").read_text())["target_len"]
    assert 1 <= saved["min_new_tokens"] <= saved["max_new_tokens"] <= target_len
    assert saved["num_beams"] == 4 and saved["no_repeat_ngram_size"] in (2, 3)
    assert GenerationConfig.from_pretrained(tiny_run).max_new_tokens == saved["max_new_tokens"]
    # The reference summaries the lengths come from: most fit the range.
    _, pairs = corpus_files
    lm = model.load(tiny_run)
    lengths = [
        len(lm.tokenizer(json.loads(line)["summary"], add_special_tokens=False)["input_ids"]) + 1
        for line in pairs.read_text().splitlines()
    ]
    inside = [
        saved["min_new_tokens"] <= min(n, target_len) <= saved["max_new_tokens"] for n in lengths
    ]
    assert sum(inside) >= 0.9 * len(lengths)


class _Summaries:
    """A stand-in summarize stream: each example is (input ids, labels, prefix length)."""

    def __init__(self, targets: list[list[int]]) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def example(self, index: int):
        prefix = [1, 7, 7, 7, 2]  # [CLS] source [SEP]: repeats here do not count
        return prefix + self.targets[index], None, len(prefix)


@pytest.mark.parametrize(
    "repeating, blocked",
    [(0, 2), (2, 2), (3, 3), (10, 3)],  # of 10 summaries; a fifth may repeat a bigram
)
def test_repeated_bigrams_are_blocked_where_the_summaries_rarely_repeat_one(repeating, blocked):
    from types import SimpleNamespace

    from trainer.prepare import generation_defaults

    once = [[10 + i, 20 + i, 30 + i, 10 + i] for i in range(10)]  # a token again, no bigram
    twice = [[10 + i, 20 + i, 10 + i, 20 + i] for i in range(10)]
    targets = twice[:repeating] + once[repeating:]
    streams = SimpleNamespace(train={"summarize": _Summaries(targets)})
    options = generation_defaults(streams, target_len=16)
    assert options["no_repeat_ngram_size"] == blocked
    assert options["min_new_tokens"] == options["max_new_tokens"] == 5  # 4 and the end


def test_summarize_decodes_as_the_run_folder_says_unless_told(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "generation_config.json").read_text())
    (run / "generation_config.json").write_text(
        json.dumps({**config, "max_new_tokens": 5, "min_new_tokens": 2, "num_beams": 2})
    )
    seen = []
    real_generate = model.api.generate
    monkeypatch.setattr(
        model.api,
        "generate",
        lambda m, s, cfg, g=None: seen.append(cfg) or real_generate(m, s, cfg, g),
    )
    lm = model.load(run)
    doc = "Return a new list with the items of the given list sorted in ascending order."
    lm.summarize(doc)
    lm.summarize(doc, max_new_tokens=8, num_beams=1)
    assert [(c.max_new_tokens, c.min_new_tokens, c.num_beams) for c in seen] == [
        (5, 2, 2),
        (8, 2, 1),
    ]
    (run / "generation_config.json").unlink()  # a folder from before: the package's defaults
    assert model.load(run).generation == model.api.DEFAULT_GENERATION
