"""The architecture choices (``position``, ``norm``, ``bias``, ``ffn``, ``qk_norm``,
``zero_init_proj``): each trains, decodes with its KV cache as without, saves and loads through
``model.load`` and the Auto classes, and a config.json without the fields is today's model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WITHOUT_PROJECT
from decoding_reference import check_beam_steps, uncached_greedy
from transformers import AutoModel, AutoModelForMaskedLM

import model
import model.api as api
import train
from data.vocab import save_tokenizer
from model.config import PRESETS, MiniTuringConfig
from model.constants import IGNORE_INDEX
from model.generate import DecodingConfig, generate
from model.hf import save_remote_code
from model.tokenizer import tokenizer_fields
from model.transformer import MiniTuringModel, never_predicted
from trainer.checkpoint import check_resumed_model
from trainer.config import build_model_config, check_config
from trainer.errors import TrainingError
from trainer.init_from import parent_options

NEW_FIELDS = ("position", "norm", "bias", "ffn", "qk_norm", "zero_init_proj")
CHOICES = {
    "default": {},
    "rope": {"position": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "no-bias": {"bias": False},
    "swiglu": {"ffn": "swiglu"},
    "relu2": {"ffn": "relu2"},
    "qk-norm": {"qk_norm": True},
    "zero-init": {"zero_init_proj": True},
    "all": {
        "position": "rope",
        "norm": "rmsnorm",
        "bias": False,
        "ffn": "swiglu",
        "qk_norm": True,
        "zero_init_proj": True,
    },
}
SHAPE = dict(
    vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
    max_position_embeddings=64, tokenizer_size=100,
)  # fmt: skip


def arch_model(choice: dict, seed: int = 0, **overrides) -> MiniTuringModel:
    torch.manual_seed(seed)
    config = MiniTuringConfig(**{**SHAPE, **choice, **overrides})
    m = MiniTuringModel(config).eval()
    if config.zero_init_proj:
        # Zero projections make every block the identity: give the test something to compute.
        with torch.no_grad():
            for block in m.blocks:
                for linear in (block.attn.out, block.ffn.down):
                    linear.weight.normal_(0, 0.05)
    return m


EVERY_CHOICE = pytest.mark.parametrize("choice", list(CHOICES.values()), ids=list(CHOICES))


def seq2seq_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(6, 100, (3, 20), generator=g)
    prefix = torch.tensor([9, 6, 12])
    lengths = torch.tensor([20, 15, 18])
    padding = (torch.arange(20) < lengths.unsqueeze(1)).long()
    labels = torch.full_like(x, IGNORE_INDEX)
    for row, (p, n) in enumerate(zip(prefix.tolist(), lengths.tolist(), strict=True)):
        labels[row, p - 1 : n - 1] = x[row, p:n]
    return x * padding, padding, prefix, labels


# ---------------------------------------------------------------------------- training


@EVERY_CHOICE
@pytest.mark.parametrize("copy", [False, True], ids=["plain", "copy"])
def test_forward_backward_and_the_sparse_last_block(choice, copy, short_rows):
    """Masked LM and prefix-LM batches give finite losses and a finite gradient for every
    parameter; the last block run at the labelled positions only (sparse_outputs) gives the
    loss of the whole block; the parameter count is the config's formula."""
    m = arch_model(choice, copy_attention=copy).train()
    assert sum(p.numel() for p in m.parameters()) == m.config.num_parameters()
    dense = arch_model(choice, copy_attention=copy, sparse_outputs=False).train()
    dense.load_state_dict(m.state_dict())
    x = torch.randint(6, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    mlm_labels = torch.where(torch.rand(x.shape) < 0.3, x, IGNORE_INDEX)
    s_x, padding, prefix, labels = seq2seq_batch()
    batches = [
        dict(input_ids=x, labels=mlm_labels),
        dict(input_ids=s_x, attention_mask=padding, prefix_lengths=prefix, labels=labels),
    ]
    for batch in batches:
        m.zero_grad()
        loss = m(**batch).loss
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(loss, dense(**batch).loss, rtol=1e-5, atol=1e-6)


@EVERY_CHOICE
def test_bf16_autocast_forward_backward(choice):
    m = arch_model(choice, copy_attention=True).train()
    s_x, padding, prefix, labels = seq2seq_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(s_x, attention_mask=padding, prefix_lengths=prefix, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_zero_init_proj_starts_the_residual_projections_at_zero():
    torch.manual_seed(0)
    m = MiniTuringModel(MiniTuringConfig(**SHAPE, zero_init_proj=True))
    for block in m.blocks:
        assert not block.attn.out.weight.any() and not block.ffn.down.weight.any()
        assert block.attn.qkv.weight.std() > 0.01 and block.ffn.up.weight.std() > 0.01


def test_qk_norm_is_an_rmsnorm_of_each_head():
    import model.transformer as transformer

    norm = torch.nn.RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4, 8)
    torch.testing.assert_close(transformer._head_norm(x, norm), norm(x))
    half = transformer._head_norm(x.bfloat16(), norm)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), norm(x), rtol=2e-2, atol=2e-2)


def test_choices_are_checked():
    for field, value in (("position", "alibi"), ("norm", "batchnorm"), ("ffn", "geglu")):
        with pytest.raises(ValueError, match=field):
            MiniTuringConfig(**{field: value})
    with pytest.raises(ValueError, match="must be even"):
        MiniTuringConfig(hidden_size=12, num_heads=4, position="rope")


def test_rotary_turns_dimension_pairs_by_position_times_frequency():
    """Dimensions i and i + d/2 are one complex number, turned by position * 10000^(-2i/d)
    (RoFormer's rotation in LLaMA's half layout)."""
    from model.ops import rotate
    from model.transformer import rotary_tables

    d, positions = 8, torch.tensor([[0, 1, 5, 1000]])
    x = torch.randn(1, 2, 4, d, dtype=torch.float64)
    turned = rotate(x, *rotary_tables(positions, d, torch.float64))
    freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions[0, :, None].double() * freq
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(
        torch.ones_like(angle), angle
    )
    torch.testing.assert_close(turned, torch.cat([z.real, z.imag], dim=-1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("copy", [False, True], ids=["plain", "copy"])
def test_rope_sees_relative_positions_only(copy):
    """Shifting every position by the same amount changes nothing with rotary positions (the
    scores depend on the distance alone), and everything with a learned table."""
    x = torch.randint(6, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    shifted = torch.arange(12).unsqueeze(0) + 37
    prefix = torch.tensor([5, 7]) if copy else None
    with torch.no_grad():
        rope = arch_model({"position": "rope"}, copy_attention=copy)
        torch.testing.assert_close(
            rope(x, prefix_lengths=prefix, position_ids=shifted).logits,
            rope(x, prefix_lengths=prefix).logits,
            rtol=1e-4,
            atol=1e-4,
        )
        learned = arch_model({}, copy_attention=copy)
        moved = learned(x, prefix_lengths=prefix, position_ids=shifted).logits
        assert not torch.allclose(moved, learned(x, prefix_lengths=prefix).logits, atol=1e-3)


# ---------------------------------------------------------------------------- decoding


@EVERY_CHOICE
@pytest.mark.parametrize("copy", [False, True], ids=["plain", "copy"])
def test_cached_greedy_decoding_equals_uncached(choice, copy):
    """Sources of three lengths, left-padded in one batch, decoded with the cache: each the
    tokens of decoding it alone with the whole sequence recomputed at every step."""
    m = arch_model(choice, seed=3, copy_attention=copy, initializer_range=0.1)
    sources = [[2, 10, 11, 12, 13, 3], [2, 20, 21, 3], [2, 30, 31, 32, 33, 34, 35, 36, 3]]
    cfg = DecodingConfig(max_new_tokens=10, no_repeat_ngram_size=0)
    batched = generate(m, sources, cfg)
    for source, got in zip(sources, batched, strict=True):
        assert got == uncached_greedy(m, source, 10)


@EVERY_CHOICE
def test_cached_beam_steps_equal_uncached(choice):
    """Beam search's cache (the source shared by a document's beams, the beams re-ranked each
    step) gives each beam the log-probabilities of its whole sequence run uncached."""
    m = arch_model(choice, seed=5, copy_attention=True, initializer_range=0.1)
    check_beam_steps(m, [[2, 10, 11, 12, 13, 3], [2, 20, 3], [2, 30, 31, 32, 3]])


def test_rope_decodes_inputs_longer_than_the_positions_learned_ones_refuse():
    """max_position_embeddings is 64: a 100-token source is refused by the learned table (as
    it always was), and decoded by rotary positions, with the cache as without."""
    source = [2] + list(range(10, 60)) * 2 + [3]
    cfg = DecodingConfig(max_new_tokens=6, no_repeat_ngram_size=0)
    learned = arch_model({}, copy_attention=True)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        generate(learned, [source], cfg)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        learned(torch.tensor([source]))
    rope = arch_model({"position": "rope"}, seed=3, copy_attention=True, initializer_range=0.1)
    (got,) = generate(rope, [source], cfg)
    assert got == uncached_greedy(rope, source, 6)
    assert len(rope(torch.tensor([source * 3])).logits[0]) == 3 * len(source)


# ---------------------------------------------------------------------------- run folders


def write_run_folder(folder: Path, tokenizer, choice: dict, seed: int = 0) -> MiniTuringModel:
    """A run folder as the trainer leaves one (config, weights, tokenizer, code) for a model of
    ``choice`` sized for ``tokenizer``."""
    torch.manual_seed(seed)
    fields = {**SHAPE, **tokenizer_fields(tokenizer), **choice, "copy_attention": True}
    m = MiniTuringModel(MiniTuringConfig(**fields, source_len=40, target_len=8)).eval()
    with torch.no_grad():  # not the init: zero projections would hide a load that drops them
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    save_remote_code(folder)
    return m


@EVERY_CHOICE
def test_save_and_load_round_trip_the_logits_exactly(choice, tokenizer, tmp_path):
    m = write_run_folder(tmp_path, tokenizer, choice)
    saved = json.loads((tmp_path / "config.json").read_text())
    config = MiniTuringConfig(**{**SHAPE, **choice})
    assert {f: saved[f] for f in NEW_FIELDS} == {f: getattr(config, f) for f in NEW_FIELDS}
    x = torch.randint(6, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    prefix = torch.tensor([5, 7])
    with torch.no_grad():
        mlm, s2s = m(x).logits, m(x, prefix_lengths=prefix).logits
        loaded = model.load(tmp_path).model
        assert torch.equal(loaded(x).logits, mlm)
        assert torch.equal(loaded(x, prefix_lengths=prefix).logits, s2s)
        auto = AutoModel.from_pretrained(tmp_path).eval()
        assert type(auto) is MiniTuringModel
        assert torch.equal(auto(x, prefix_lengths=prefix).logits, s2s)
        masked = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
        never = never_predicted(m.config)
        assert torch.equal(masked(x).logits, mlm.masked_fill(never, float("-inf")))


def test_old_config_json_without_the_fields_is_today_s_model(tokenizer, tmp_path):
    """A folder written before the choices existed: its config.json has none of the fields, and
    it loads as the model it was (learned positions, LayerNorm with biases, GELU), weights and
    logits the same, by model.load and by the Auto classes."""
    m = write_run_folder(tmp_path, tokenizer, {})
    data = json.loads((tmp_path / "config.json").read_text())
    for key in NEW_FIELDS:
        data.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(data))
    keys = [
        "embed.weight", "position.weight",
        *(f"blocks.{i}.{name}" for i in range(2) for name in (
            "ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.out.weight",
            "attn.out.bias", "ln2.weight", "ln2.bias", "ffn.up.weight", "ffn.up.bias",
            "ffn.down.weight", "ffn.down.bias",
        )),
        "ln_f.weight", "ln_f.bias", "copy_gate.weight", "copy_gate.bias",
    ]  # fmt: skip
    x = torch.randint(6, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    prefix = torch.tensor([5, 7])
    with torch.no_grad():
        expected = m(x, prefix_lengths=prefix).logits
        for loaded in (model.load(tmp_path).model, AutoModel.from_pretrained(tmp_path).eval()):
            c = loaded.config
            assert (c.position, c.norm, c.bias, c.ffn, c.qk_norm, c.zero_init_proj) == (
                "learned", "layernorm", True, "gelu", False, False
            )  # fmt: skip
            assert list(loaded.state_dict()) == keys
            assert isinstance(loaded.ln_f, torch.nn.LayerNorm)
            assert torch.equal(loaded(x, prefix_lengths=prefix).logits, expected)


REMOTE_SCRIPT = (
    WITHOUT_PROJECT
    + r"""
import json

run = sys.argv[1]
import torch
from transformers import AutoModel, AutoModelForMaskedLM

x = torch.tensor(json.loads(sys.argv[2]))
out = {}
with torch.no_grad():
    base = AutoModel.from_pretrained(run, trust_remote_code=True).eval()
    out["base"] = base(x, prefix_lengths=torch.tensor([5, 7])).logits.tolist()
    out["class"] = type(base).__module__
    mlm = AutoModelForMaskedLM.from_pretrained(run, trust_remote_code=True).eval()
    out["mlm"] = mlm(x).logits.tolist()
print("RESULT " + json.dumps(out))
"""
)


def test_trust_remote_code_loads_every_choice(tokenizer, tmp_path):
    """The folder's own code copies, in an interpreter without this package, give the logits
    of every non-default choice at once (bit for bit: the same code on the same machine)."""
    m = write_run_folder(tmp_path, tokenizer, CHOICES["all"])
    x = torch.randint(6, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    out = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path), json.dumps(x.tolist())],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["class"].startswith("transformers_modules.")
    with torch.no_grad():
        expected = m(x, prefix_lengths=torch.tensor([5, 7])).logits
        never = never_predicted(m.config)
        expected_mlm = m(x).logits.masked_fill(never, float("-inf"))
    assert torch.equal(torch.tensor(result["base"]), expected)
    assert torch.equal(torch.tensor(result["mlm"]), expected_mlm)


def test_summarize_reads_past_the_positions_with_rope_and_truncates_with_learned(
    tokenizer, tmp_path, monkeypatch
):
    """LM.summarize: a learned-position model truncates a long document to its positions (as
    before); a rope model reads max_source_tokens of it, beyond max_position_embeddings."""
    seen = []

    def recording(m, sources, cfg, generator=None):
        seen.append(max(len(s) for s in sources))
        return generate(m, sources, cfg, generator)

    monkeypatch.setattr(api, "generate", recording)
    doc = " ".join(f"word{i} is here." for i in range(200))
    write_run_folder(tmp_path / "learned", tokenizer, {})
    write_run_folder(tmp_path / "rope", tokenizer, {"position": "rope"})
    learned, rope = model.load(tmp_path / "learned"), model.load(tmp_path / "rope")
    assert isinstance(learned.summarize(doc, max_new_tokens=4, num_beams=2), str)
    assert seen.pop() == 40  # the source length it was "trained" at
    learned.summarize(doc, max_new_tokens=4, num_beams=2, max_source_tokens=500)
    assert seen.pop() == 64 - 4  # the positions left after the summary's
    assert isinstance(rope.summarize(doc, max_new_tokens=4, num_beams=2), str)
    assert seen.pop() == 40
    assert isinstance(rope.summarize(doc, max_new_tokens=4, max_source_tokens=150), str)
    assert seen.pop() == 150
    with pytest.raises(ValueError, match="max_source_tokens must be >= 3"):
        rope.summarize(doc, max_source_tokens=2)
    assert isinstance(rope.fill_mask("word " * 100 + "[MASK]"), list)
    with pytest.raises(ValueError, match="reads at most"):
        learned.fill_mask("word " * 100 + "[MASK]")


# ---------------------------------------------------------------------------- sizes and flags


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_swiglu_has_about_the_parameters_of_gelu(preset):
    shape = {k: v for k, v in PRESETS[preset]().items() if k != "seq_len"}
    gelu = MiniTuringConfig(**shape).num_parameters(non_embedding=True)
    swiglu = MiniTuringConfig(**shape, ffn="swiglu")
    assert swiglu.ffn_hidden_size % 8 == 0
    assert abs(swiglu.num_parameters(non_embedding=True) / gelu - 1) < 0.02
    small = MiniTuringConfig(**SHAPE, ffn="swiglu")
    assert abs(small.num_parameters() / MiniTuringConfig(**SHAPE).num_parameters() - 1) < 0.025


def test_flags_reach_the_model_config_and_default_to_today():
    default = build_model_config(train.config_from_args([]))
    # Rotary positions, RMSNorm and ReLU squared: the trainer's defaults since 2026-12-07.
    assert {f: getattr(default, f) for f in NEW_FIELDS} == dict(
        position="rope", norm="rmsnorm", bias=True, ffn="relu2", qk_norm=False,
        zero_init_proj=False,
    )  # fmt: skip
    cfg = train.config_from_args(
        "--position rope --norm rmsnorm --no-bias --ffn swiglu --qk-norm --zero-init-proj "
        "--seq-len 1024 --source-len 900 --target-len 200".split()
    )
    check_config(cfg)  # rotary positions: lengths past --max-positions are fine
    built = build_model_config(cfg)
    assert {f: getattr(built, f) for f in NEW_FIELDS} == CHOICES["all"]
    for flags, match in (
        ("--ffn geglu", "--ffn must be one of"),
        ("--norm batchnorm", "--norm must be one of"),
        ("--position alibi", "--position must be one of"),
        ("--position learned --seq-len 1024", "larger than the model supports"),
        ("--position rope --hidden-size 36 --num-heads 4", "must be even"),
    ):
        with pytest.raises(TrainingError, match=match):
            check_config(train.config_from_args(flags.split()))


def test_a_child_or_a_resumed_run_keeps_the_architecture(tokenizer, tmp_path):
    """--init-from takes the parent's choices and refuses others; --resume refuses options
    that build another architecture than the folder's."""
    write_run_folder(tmp_path, tokenizer, {"position": "rope", "ffn": "swiglu"})
    base = parent_options(str(tmp_path), {})["model"]
    assert (base["position"], base["ffn"], base["norm"], base["bias"]) == (
        "rope", "swiglu", "layernorm", True
    )  # fmt: skip
    with pytest.raises(TrainingError, match="--ffn gelu contradicts"):
        parent_options(str(tmp_path), {"model": {"ffn": "gelu"}})
    with pytest.raises(TrainingError, match="--no-bias contradicts"):
        parent_options(str(tmp_path), {"model": {"bias": False}})
    saved = MiniTuringConfig.from_pretrained(tmp_path)
    built = MiniTuringConfig(**{**saved.to_dict(), "qk_norm": True})
    with pytest.raises(TrainingError, match="qk_norm is False there"):
        check_resumed_model(saved, built, tmp_path)
