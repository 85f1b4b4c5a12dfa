"""The copy path (pointer-generator): the loss against a mixture computed by hand, cached decoding
against uncached, bf16, old run folders, data parallelism, and a task that copying makes easy."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from decoding_reference import check_beam_steps, uncached_greedy

import model.losses as losses
import model.transformer as transformer
from model.config import MiniTuringConfig
from model.constants import IGNORE_INDEX
from model.generate import DecodingConfig, generate
from model.transformer import MiniTuringModel


def copy_model(seed: int = 0, **overrides) -> MiniTuringModel:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
        max_position_embeddings=64, tokenizer_size=100, copy_attention=True,
    )  # fmt: skip
    cfg.update(overrides)
    return MiniTuringModel(MiniTuringConfig(**cfg)).eval()


def seq2seq_batch(seed: int = 0):
    """Three rows of [CLS] source [SEP] target, right-padded, prefixes of different lengths;
    labels on each row's target (the prefix's last position onward)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(6, 100, (3, 20), generator=g)
    x[:, 0] = 2
    prefix = torch.tensor([9, 6, 12])
    lengths = torch.tensor([20, 15, 18])
    padding = (torch.arange(20) < lengths.unsqueeze(1)).long()
    labels = torch.full_like(x, IGNORE_INDEX)
    for row, (p, n) in enumerate(zip(prefix.tolist(), lengths.tolist(), strict=True)):
        x[row, p - 1] = 3
        x[row, p + 1] = x[row, 2]  # a target token that also occurs in the source
        labels[row, p - 1 : n - 1] = x[row, p:n]
        labels[row, n - 1] = 3
    x = x * padding
    return x, padding, prefix, labels


@torch.no_grad()
def reference_loss(model: MiniTuringModel, x, padding, prefix, labels) -> torch.Tensor:
    """-mean log p(label), with p = p_gen * p_vocab + (1 - p_gen) * p_copy written out position
    by position: the copy layer's queries and keys recomputed from its input, each head's
    softmax over the row's source, the mean over heads, summed per token id in a loop."""
    c = model.config
    layer = c.copy_layer % c.num_layers
    seen = {}

    def keep_input(module, args):
        seen["x"] = args[0]

    hook = model.blocks[layer].attn.register_forward_pre_hook(keep_input)
    h = model.hidden_states(x, attention_mask=padding, prefix_lengths=prefix)
    hook.remove()
    attn = model.blocks[layer].attn
    b, t, d = seen["x"].shape
    heads, dh = c.num_heads, c.head_dim
    qkv = attn.qkv(seen["x"]).view(b, t, 3, heads, dh)
    q, k = qkv[:, :, 0], qkv[:, :, 1]  # (b, t, heads, dh)
    weight, bias = model.copy_gate.weight[0], model.copy_gate.bias[0]
    total, count = 0.0, 0
    for row in range(b):
        src = int(prefix[row])  # no padding inside a prefix
        for pos in range(t):
            target = int(labels[row, pos])
            if target == IGNORE_INDEX:
                continue
            use = range(heads) if c.copy_head is None else [c.copy_head]
            attention = torch.stack(
                [torch.softmax(k[row, :src, i] @ q[row, pos, i] / dh**0.5, 0) for i in use]
            ).mean(0)
            p_copy = torch.zeros(c.vocab_size)
            for j in range(src):
                p_copy[x[row, j]] += attention[j]
            p_vocab = torch.softmax(model.embed.weight @ h[row, pos], 0)
            gate_in = torch.cat([h[row, pos], model.embed.weight[x[row, pos]]])
            p_gen = torch.sigmoid(weight @ gate_in + bias)
            p = p_gen * p_vocab + (1 - p_gen) * p_copy
            if pos < src - 1:  # a masked source word, filled in place: the output layer alone
                p = p_vocab
            total -= float(torch.log(p[target]))
            count += 1
    return torch.tensor(total / count)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"copy_layer": 0}, {"copy_head": 1}, {"copy_layer": 0, "num_layers": 3}],
    ids=["last-layer", "first-layer", "one-head", "middle-layer"],
)
def test_loss_equals_the_mixture_computed_by_hand(overrides):
    model = copy_model(1, initializer_range=0.2, **overrides)  # attention far from uniform
    with torch.no_grad():
        model.copy_gate.bias.fill_(0.5)
    x, padding, prefix, labels = seq2seq_batch()
    expected = reference_loss(model, x, padding, prefix, labels)
    with torch.no_grad():
        evaluated = model(x, attention_mask=padding, prefix_lengths=prefix, labels=labels)
    trained = model.train()(x, attention_mask=padding, prefix_lengths=prefix, labels=labels)
    assert trained.loss.requires_grad and trained.logits is None
    torch.testing.assert_close(evaluated.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained.loss.detach(), expected, rtol=1e-5, atol=1e-5)
    # Evaluation's logits are the mixture's log-probabilities at the labelled positions.
    assert evaluated.logits.shape == (int((labels >= 0).sum()), 128)
    torch.testing.assert_close(evaluated.logits.exp().sum(-1), torch.ones(len(evaluated.logits)))


def test_masked_source_words_are_predicted_by_the_output_layer_alone():
    """A summarization batch whose sources are also masked (--source-mask-rate): labels inside
    the source come from the output layer, the target's from the mixture, in one mean."""
    model = copy_model(1, initializer_range=0.2)
    with torch.no_grad():
        model.copy_gate.bias.fill_(0.5)
    x, padding, prefix, labels = seq2seq_batch()
    for row, positions in enumerate([[1, 4], [2], [3, 5, 10]]):
        for pos in positions:
            labels[row, pos] = x[row, pos]
            x[row, pos] = 4  # [MASK]
    expected = reference_loss(model, x, padding, prefix, labels)
    with torch.no_grad():
        evaluated = model(x, attention_mask=padding, prefix_lengths=prefix, labels=labels)
    trained = model.train()(x, attention_mask=padding, prefix_lengths=prefix, labels=labels)
    torch.testing.assert_close(evaluated.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained.loss.detach(), expected, rtol=1e-5, atol=1e-5)
    assert int(evaluated.num_label_tokens) == int((labels >= 0).sum())
    torch.testing.assert_close(evaluated.logits.exp().sum(-1), torch.ones(len(evaluated.logits)))
    trained.loss.backward()
    assert model.copy_gate.weight.grad.abs().sum() > 0


def test_copy_is_off_for_masked_lm_batches_and_by_default():
    plain = MiniTuringModel(MiniTuringConfig(vocab_size=128, hidden_size=32, num_heads=4))
    assert plain.config.copy_attention is False and not hasattr(plain, "copy_gate")
    model = copy_model(2)
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()
    x = torch.randint(6, 100, (2, 10))
    labels = torch.where(torch.rand(2, 10) < 0.3, x, IGNORE_INDEX)
    labels[0, 0] = x[0, 0]
    full = model(x).logits  # bidirectional: the output layer alone
    torch.testing.assert_close(full, model.logits_from_hidden(model.hidden_states(x)))
    expected = F.cross_entropy(full[labels >= 0], labels[labels >= 0])
    torch.testing.assert_close(model(x, labels=labels).loss, expected)
    out = model.train()(x, labels=labels)
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    # The gate takes part in a masked-LM step's graph (for DDP), with a zero gradient.
    assert all(p.grad is not None and not p.grad.any() for p in model.copy_gate.parameters())


@pytest.mark.parametrize("copy_layer", [-1, 0])
def test_labelled_positions_only_change_nothing_with_copy(monkeypatch, copy_layer, short_rows):
    """The last block runs at labelled positions only; loss and gradients equal the full run's."""
    model = copy_model(3, num_layers=3, copy_layer=copy_layer).train()
    x, padding, prefix, labels = seq2seq_batch(1)
    assert losses.labelled_positions(labels != IGNORE_INDEX)[0] is not None

    def loss_and_grads():
        model.zero_grad()
        out = model(x, attention_mask=padding, prefix_lengths=prefix, labels=labels)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    fast, fast_grads = loss_and_grads()
    monkeypatch.setattr(transformer, "labelled_positions", lambda selected: (None, selected))
    full, full_grads = loss_and_grads()
    torch.testing.assert_close(fast, full)
    assert all(g.any() for g in fast_grads[-2:])  # the gate learns
    for a, b in zip(fast_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_chunked_log_prob_equals_the_whole_log_softmax_one(monkeypatch, autocast):
    """linear_log_prob: the targets' log_softmax of the full logits and the cross-entropy
    against the uniform distribution, in value and in gradients under upstream gradients that
    differ row by row and between the two outputs; several chunks and a short last one."""
    torch.manual_seed(0)
    monkeypatch.setitem(losses._CE_CHUNK_ELEMENTS, "cpu", 50 * 7)  # 7 rows a chunk
    h = torch.randn(31, 16, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, 50, (31,))
    up_log_p, up_uniform = torch.randn(31), torch.randn(31)

    def value_and_grads(fn):
        h.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            log_p, uniform = fn()
        ((log_p * up_log_p).sum() + (uniform * up_uniform).sum()).backward()
        return log_p, uniform, h.grad, weight.grad

    def whole():
        log_softmax = F.log_softmax(F.linear(h, weight).float(), -1)
        return log_softmax.gather(1, targets[:, None])[:, 0], -log_softmax.mean(-1)

    chunked = value_and_grads(lambda: losses.linear_log_prob(h, weight, targets))
    reference = value_and_grads(whole)
    tol = dict(atol=0.05, rtol=0.02) if autocast else {}
    for a, b in zip(chunked, reference, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_label_smoothing_of_the_copy_loss_smooths_the_output_layer_only():
    """In training, the copy mixture's loss with label smoothing e is (1 - e) x its NLL plus e x
    the output layer's cross-entropy against the uniform distribution, per label token;
    evaluation reports the plain NLL whatever is asked."""
    model = copy_model().train()
    x, padding, prefix, labels = seq2seq_batch()
    batch = dict(input_ids=x, attention_mask=padding, prefix_lengths=prefix, labels=labels)
    plain = model(**batch).loss
    smoothed = model(**batch, label_smoothing=0.1).loss
    # The uniform term, from the full logits at the labelled positions.
    with torch.no_grad():
        h = model.hidden_states(x, attention_mask=padding, prefix_lengths=prefix)
        log_softmax = F.log_softmax(model.logits_from_hidden(h).float(), -1)
        uniform = -log_softmax.mean(-1)[labels != IGNORE_INDEX].mean()
    torch.testing.assert_close(smoothed, 0.9 * plain + 0.1 * uniform, rtol=1e-4, atol=1e-4)
    smoothed.backward()
    assert model.embed.weight.grad is not None and model.copy_gate.weight.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, label_smoothing=0.1).loss, model(**batch).loss)


@pytest.mark.parametrize("copy_attention", [True, False], ids=["copy", "plain"])
@pytest.mark.parametrize("chunked_loss", [True, False], ids=["chunked", "whole"])
def test_label_smoothing_never_touches_the_masked_source_words(copy_attention, chunked_loss):
    """What smoothing adds to a batch's summed loss comes from its target labels alone: the
    same with and without labels on masked source words (same inputs, so same hidden states)."""
    model = copy_model(copy_attention=copy_attention, chunked_loss=chunked_loss).train()
    x, padding, prefix, target_only = seq2seq_batch()
    with_source = target_only.clone()
    for row, pos in ((0, 3), (1, 2), (2, 5), (2, 7)):
        with_source[row, pos], x[row, pos] = x[row, pos], 4

    def smoothing_adds(labels):
        batch = dict(input_ids=x, attention_mask=padding, prefix_lengths=prefix, labels=labels)
        count = int((labels != IGNORE_INDEX).sum())
        return (model(**batch, label_smoothing=0.1).loss - model(**batch).loss) * count

    added = smoothing_adds(target_only)
    assert abs(added.item()) > 1e-3
    torch.testing.assert_close(smoothing_adds(with_source), added, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "overrides", [{}, {"copy_layer": 0, "copy_head": 2}], ids=["last-layer", "first-layer-head"]
)
def test_cached_greedy_decoding_equals_uncached(overrides):
    model = copy_model(4, initializer_range=0.1, **overrides)
    sources = [[2, 10, 11, 12, 13, 3], [2, 20, 21, 3], [2, 30, 31, 32, 33, 34, 35, 36, 3]]
    cfg = DecodingConfig(max_new_tokens=10, no_repeat_ngram_size=0)
    batched = generate(model, sources, cfg)
    assert any(t in s for s, g in zip(sources, batched, strict=True) for t in g)  # copies
    for source, got in zip(sources, batched, strict=True):
        assert got == uncached_greedy(model, source, 10)


@pytest.mark.parametrize("overrides", [{}, {"copy_layer": 0}], ids=["last-layer", "first-layer"])
def test_cached_beam_steps_equal_uncached(overrides):
    """Beam search's cache (the source shared by a document's beams, beams re-ranked each step)
    gives each beam the log-probabilities of its whole sequence run uncached."""
    model = copy_model(5, initializer_range=0.1, **overrides)
    check_beam_steps(model, [[2, 10, 11, 12, 13, 3], [2, 20, 3], [2, 30, 31, 32, 3]])


def test_beam_search_and_sampling_run_with_copy():
    model = copy_model(6, initializer_range=0.1)
    sources = [[2, 10, 11, 3], [2, 50, 51, 52, 53, 54, 3]]
    cfg = DecodingConfig(max_new_tokens=8, num_beams=3)
    together = generate(model, sources, cfg)
    assert together == [generate(model, [s], cfg)[0] for s in sources]
    greedy = generate(model, sources, DecodingConfig(max_new_tokens=8))
    top1 = DecodingConfig(max_new_tokens=8, do_sample=True, top_k=1)
    assert generate(model, sources, top1, torch.Generator().manual_seed(0)) == greedy
    cfg = DecodingConfig(max_new_tokens=8, do_sample=True, top_p=0.9, temperature=1.5)
    a = generate(model, sources, cfg, torch.Generator().manual_seed(1))
    assert a == generate(model, sources, cfg, torch.Generator().manual_seed(1))


def test_bf16_autocast_is_finite_and_close():
    model = copy_model(7, initializer_range=0.1)
    x, padding, prefix, labels = seq2seq_batch(2)
    batch = dict(attention_mask=padding, prefix_lengths=prefix, labels=labels)
    with torch.no_grad():
        fp32 = model(x, **batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            bf16 = model(x, **batch)
        trained = model.train()(x, **batch)
    trained.loss.backward()
    assert bf16.logits.dtype == torch.float32 and torch.isfinite(bf16.logits).all()
    torch.testing.assert_close(bf16.loss, fp32.loss, rtol=0.02, atol=0.02)
    torch.testing.assert_close(trained.loss.detach(), fp32.loss, rtol=0.02, atol=0.02)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    sources = [[2, 10, 11, 12, 3], [2, 20, 3]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for beams in (1, 3):
            out = generate(model, sources, DecodingConfig(max_new_tokens=5, num_beams=beams))
            assert len(out) == 2


# ---------------------------------------------------------------------------- config


def test_config_without_the_copy_fields_loads_as_before(tmp_path):
    model = copy_model(8)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["copy_attention"] is True and saved["copy_layer"] == -1
    again = MiniTuringModel.from_pretrained(tmp_path).eval()
    assert again.config.copy_attention and hasattr(again, "copy_gate")
    x = torch.randint(6, 100, (1, 10))
    lengths = torch.tensor([6])
    torch.testing.assert_close(
        model(x, prefix_lengths=lengths).logits, again(x, prefix_lengths=lengths).logits
    )
    # A folder from before the copy path: its config.json has none of the fields.
    old = tmp_path / "old"
    MiniTuringModel(MiniTuringConfig(vocab_size=128, hidden_size=32, num_heads=4)).save_pretrained(
        old
    )
    data = json.loads((old / "config.json").read_text())
    for key in ("copy_attention", "copy_layer", "copy_head"):
        data.pop(key)
    (old / "config.json").write_text(json.dumps(data))
    loaded = MiniTuringModel.from_pretrained(old)
    assert loaded.config.copy_attention is False and not hasattr(loaded, "copy_gate")


def test_copy_fields_are_checked():
    with pytest.raises(ValueError, match="copy_layer"):
        MiniTuringConfig(num_layers=2, copy_layer=2)
    with pytest.raises(ValueError, match="copy_head"):
        MiniTuringConfig(num_heads=4, copy_head=4)


# ---------------------------------------------------------------------------- learning


def marked_span_batch(gen: torch.Generator, b: int, source_len: int = 16, span: int = 6):
    """Random tokens; the target is the ``span`` tokens after a marker token (5) placed at a
    random position of the source: to be found by content, then copied."""
    src = torch.randint(6, 100, (b, source_len), generator=gen)
    start = torch.randint(1, source_len - span + 1, (b,), generator=gen)
    src[torch.arange(b), start - 1] = 5
    target = src.gather(1, start.unsqueeze(1) + torch.arange(span))
    prefix = torch.cat([torch.full((b, 1), 2), src, torch.full((b, 1), 3)], dim=1)
    x = torch.cat([prefix, target], dim=1)
    p = prefix.shape[1]
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[:, p - 1 : p - 1 + span] = target
    labels[:, p - 1 + span] = 3
    return x, labels, torch.full((b,), p)


def _train_and_score(copy: bool, steps: int) -> float:
    torch.manual_seed(0)
    config = MiniTuringConfig(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, ffn_size=128,
        max_position_embeddings=64, tokenizer_size=100, copy_attention=copy,
    )  # fmt: skip
    model = MiniTuringModel(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, labels, prefix = marked_span_batch(gen, 32)
        loss = model(x, prefix_lengths=prefix, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, labels, prefix = marked_span_batch(torch.Generator().manual_seed(1234), 256)
    with torch.no_grad():
        out = model(x, prefix_lengths=prefix, labels=labels)
    return float((out.logits.argmax(-1) == labels[labels >= 0]).float().mean())


def test_copy_learns_to_copy_a_marked_span_where_the_plain_head_does_not():
    """400 steps (a few seconds): the copy model is near perfect (1.0 on four seeds, 0.98 on
    the worst); the same network without the copy path is at 0.2-0.35."""
    copy, plain = _train_and_score(True, 400), _train_and_score(False, 400)
    assert copy >= 0.95, copy
    assert plain <= 0.6, plain
