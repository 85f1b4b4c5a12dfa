"""bench/: both sides see the same data and count tokens the same way, ours runs as train.py
with the flags it is given, the FLOP formula is what the model computes, every ratio comes from
measured numbers, and the table keeps its shape."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import compare, data_scale
from bench.hf import seq2seq_tokens

TINY = [
    "--vocab-size", "400", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2",
    "--ffn-size", "64", "--seq-len", "32", "--max-positions", "128", "--source-len", "64",
    "--target-len", "16", "--batch-size", "8", "--warmup", "2", "--steps", "3",
    "--seq2seq-warmup", "2", "--seq2seq-steps", "3",
    "--device", "cpu", "--precision", "fp32", "--train-rounds", "1",
]  # fmt: skip


def data_flags(corpus_files) -> list[str]:
    text_file, pairs = corpus_files
    return ["--train-text", str(text_file), "--train-pairs", str(pairs)]


def prepared(tmp_path, corpus_files, parts: str):
    args = compare.build_parser().parse_args(TINY + data_flags(corpus_files) + ["--parts", parts])
    settings = compare.resolve(args)
    return args, settings, compare.prepare(args, settings, tmp_path)


# ---------------------------------------------------------------------------- same data


def test_hf_side_trains_on_our_blocks_and_pairs(tmp_path, corpus_files):
    """The HF datasets hold exactly the blocks our masked-LM stream draws from, and our framed
    pairs split into BART's source and labels."""
    from datasets import load_from_disk

    from data.config import DataConfig
    from data.objectives.masked_lm import block, pack_blocks
    from data.pipeline import build_streams
    from data.raw import load_raw
    from model.tokenizer import load_tokenizer

    args, settings, spec = prepared(tmp_path, corpus_files, "mlm,seq2seq")
    tokenizer = load_tokenizer(spec["tokenizer"])
    cfg = DataConfig(train_text=args.train_text, train_pairs=args.train_pairs, source_len=64,
                     target_len=16)  # fmt: skip
    streams = build_streams(load_raw(cfg), tokenizer, cfg, ["masked_lm", "summarize"], 32)
    flat, cls = streams.train["masked_lm"].flat, spec["ids"]["cls"]
    blocks = load_from_disk(str(tmp_path / "mlm-data"))["input_ids"]
    assert len(blocks) == pack_blocks(flat, 32) > 8
    for i in (0, 1, len(blocks) - 1):
        assert np.array_equal(blocks[i], block(flat, i, 32, cls))
    pairs = load_from_disk(str(tmp_path / "seq2seq-data"))
    ours = streams.train["summarize"]
    assert len(pairs) == len(ours)
    inputs, labels, prefix = ours.example(3)
    assert pairs[3]["input_ids"] == list(inputs[:prefix])
    assert pairs[3]["labels"] == list(labels[prefix - 1 :])


def test_both_sides_count_the_same_tokens(tokenizer):
    """Our loop counts a batch's non-padding positions; the BART hook counts the same number
    on the same pairs, framed by our stream (build_example) and split as compare.prepare
    splits them."""
    from transformers import DataCollatorForSeq2Seq

    from data.batching import Seq2SeqStream
    from model.tokenizer import special_ids

    ids = special_ids(tokenizer)
    rng = np.random.default_rng(0)
    sources = [rng.integers(10, 300, size=n) for n in (3, 40, 70, 12)]
    targets = [rng.integers(10, 300, size=n) for n in (2, 30, 5, 16)]
    stream = Seq2SeqStream("summarize", sources, targets, ids, source_len=32, target_len=8)
    ours = stream.batch(np.arange(4), np.arange(4), 0)
    expected = sum(
        min(len(s), 30) + 2 + min(len(t), 7) for s, t in zip(sources, targets, strict=True)
    )
    assert int(ours["attention_mask"].sum()) == expected < ours["input_ids"].size

    examples = [stream.example(i) for i in range(4)]
    hf = [{"input_ids": x[:p].tolist(), "labels": y[p - 1 :].tolist()} for x, y, p in examples]
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(hf)
    tokens, positions = seq2seq_tokens(batch)
    assert int(tokens) == expected and positions > expected


def test_summary_counts_real_tokens_after_warm_up(tmp_path, corpus_files, without_plot):
    """What compare.py reads of our run: the timed window of summary.json."""
    from conftest import TINY_FLAGS

    import train

    for objective, padded in (("masked_lm=1", False), ("summarize=1", True)):
        out = tmp_path / objective[:3]
        flags = TINY_FLAGS + data_flags(corpus_files) + ["--objectives", objective]
        flags += ["--output-dir", str(out), "--max-steps", "6", "--log-every", "2"]
        train.train(train.config_from_args(flags))
        s = json.loads((out / "summary.json").read_text())
        assert s["timed_tokens"] == (4 * 8 * 32 if not padded else s["timed_tokens"])
        assert s["tokens_per_s"] == pytest.approx(s["timed_tokens"] / s["timed_seconds"])
        assert (s["timed_real_tokens"] < s["timed_tokens"]) is padded
        assert s["padding_share"] == pytest.approx(1 - s["timed_real_tokens"] / s["timed_tokens"])
        assert s["peak_memory_mb"] > 0


def test_our_side_is_train_py_with_the_benchmark_settings(tmp_path):
    import train
    from model.config import PRESETS
    from trainer.config import ModelOptions

    args = compare.build_parser().parse_args(TINY + ["--train-text", "a.txt"])
    spec = {"shape": {**PRESETS["tiny"](), "seq_len": 32, "max_positions": 128},
            "warmup": 2, "steps": 3, "lr_warmup": 1, "device": "cpu", "precision": "bf16",
            "tokenizer": "tok", "mask_rate": 0.15}  # fmt: skip
    flags = compare.ours_flags(args, spec, "mlm")
    cfg = train.config_from_args(flags)
    assert cfg.run.max_steps == 5 and cfg.run.log_every == 2  # warm-up = the first log window
    assert cfg.run.precision == "bf16" and cfg.run.objectives == "masked_lm=1"
    assert (cfg.model.hidden_size, cfg.model.seq_len, cfg.optim.batch_size) == (256, 32, 8)
    assert cfg.data.train_text == ["a.txt"] and cfg.data.tokenizer == "tok"
    assert cfg.model == ModelOptions(
        hidden_size=256, num_layers=4, num_heads=4, ffn_size=1024, seq_len=32, max_positions=128
    )  # the trainer's defaults
    # --architecture bert: ours computes what BertForMaskedLM does, so the ratio is the trainer's.
    args = compare.build_parser().parse_args(TINY + ["--architecture", "bert"])
    cfg = train.config_from_args(compare.ours_flags(args, spec, "mlm"))
    assert (cfg.model.position, cfg.model.norm, cfg.model.ffn) == ("learned", "layernorm", "gelu")
    assert cfg.model.hidden_act == "gelu" and cfg.model.bias


# ---------------------------------------------------------------------------- FLOPs


def test_counted_flops_are_the_nominal_ones_when_nothing_is_skipped():
    """The formula gpu_throughput's MFU divides by: with every position labelled and no lever
    skipping work, FlopCounterMode counts the config's formula (up to biases and norms); the
    default model, reading 15% of the positions, does less."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from model.config import MiniTuringConfig
    from model.transformer import MiniTuringModel

    shape = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=2, ffn_size=128)
    x = torch.randint(6, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    labels = torch.where(torch.rand(x.shape) < 0.15, x, -100)
    counted = {}
    for name, options, lab in (("dense", {"sparse_outputs": False}, x), ("default", {}, labels)):
        model = MiniTuringModel(MiniTuringConfig(**shape, **options)).train()
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, labels=lab).loss.backward()
        counted[name] = counter.get_total_flops() / x.numel()
    nominal = MiniTuringConfig(**shape).flops_per_token(32)
    assert counted["dense"] == pytest.approx(nominal, rel=0.03)
    assert counted["default"] < 0.9 * nominal


# ---------------------------------------------------------------------------- arithmetic


def test_rows_compute_ratios_from_results():
    spec = {"bart_layers": [1, 1]}
    results = {
        "mlm_hf": {"seconds": 2.0, "tokens": 800, "peak_mem_mib": 10.0, "params": 5},
        "mlm_ours": {"seconds": 1.0, "tokens": 1000, "data_wait": 0.01, "peak_mem_mib": 9.0,
                     "params": 5},
        "seq2seq_hf": {"error": "exit status 1"},
        "seq2seq_ours": {"seconds": 1.0, "tokens": 300, "data_wait": 0.0, "padding_share": 0.1,
                         "peak_mem_mib": 9.0},
    }  # fmt: skip
    rows = compare.build_rows(spec, results)
    by = {(r["part"], r["contestant"]): r for r in rows}
    assert by[("mlm", "ours train.py masked_lm")]["ratio"] == pytest.approx(2.5)
    named = compare.build_rows(spec, results, "bert")
    assert named[1]["contestant"] == "ours train.py masked_lm (HF's architecture)"
    # A failed side shows as failed and leaves no ratio behind.
    assert by[("seq2seq", "HF BART 1+1 layers + Trainer")]["value"] is None
    assert by[("seq2seq", "ours train.py summarize")]["ratio"] is None
    table = compare.format_table(rows)
    assert "FAILED" in table and "2.50x" in table
    header, rule, *lines = table.splitlines()
    assert header.split()[:3] == ["part", "contestant", "speed"] and len(lines) == len(rows)


def test_repeated_runs_pool_tokens_and_seconds_and_calls():
    """3,000 tokens in 2 s and 1,000 in 2 s are 1,000 tok/s, not the mean of 1,500 and 500; a
    failed run stands for all."""
    first = {"seconds": 2.0, "tokens": 3000, "data_wait": 0.01, "padding_share": 0.1,
             "peak_mem_mib": 90.0}  # fmt: skip
    second = {"seconds": 2.0, "tokens": 1000, "data_wait": 0.03, "padding_share": 0.2,
              "peak_mem_mib": 80.0}  # fmt: skip
    merged = compare.pool(first, second)
    assert merged["tokens"] / merged["seconds"] == pytest.approx(1000.0)
    assert merged["runs"] == [1500.0, 500.0] and merged["peak_mem_mib"] == 90.0
    assert merged["data_wait"] == pytest.approx(0.02)
    assert merged["padding_share"] == pytest.approx(0.125)
    assert compare.pool(merged, second)["runs"] == [1500.0, 500.0, 500.0]
    failed = {"error": "exit status 1"}
    assert compare.pool(first, failed) is failed and compare.pool(failed, second) is failed
    assert compare.pool(None, first) is first


def test_sides_run_hf_ours_ours_hf():
    assert compare.tasks_for(["mlm"]) == ["mlm_hf", "mlm_ours"]
    assert compare.tasks_for(["seq2seq"], train_rounds=3) == [
        "seq2seq_hf", "seq2seq_ours", "seq2seq_ours", "seq2seq_hf", "seq2seq_hf", "seq2seq_ours"
    ]  # fmt: skip


def test_flags_that_cannot_work_are_refused():
    for argv, message in (
        (["--parts", "mlm,speed"], "unknown"),
        (["--preset", "base", "--device", "cpu"], "GPU"),
        (["--bart-layers", "2"], "ENC,DEC"),
        (["--source-len", "500", "--target-len", "32"], "max-positions"),
        (["--steps", "0"], ">= 1"),
    ):
        with pytest.raises(SystemExit, match=message):
            compare.resolve(compare.build_parser().parse_args(argv + ["--device", "cpu"]))


def test_unreadable_data_is_a_clear_error(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"document": "a b c", "summary": "a"}\nnot json\n')
    with pytest.raises(SystemExit, match="pairs.jsonl"):
        compare.main(TINY + ["--train-pairs", str(bad), "--parts", "seq2seq"])


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_benchmark_runs_every_part_and_reports_measured_ratios(tmp_path, corpus_files, capsys):
    pytest.importorskip("accelerate", reason="HF Trainer needs accelerate (pip install .[bench])")
    out = tmp_path / "bench.json"
    flags = TINY + data_flags(corpus_files) + ["--json", str(out), "--precision", "bf16"]
    assert compare.main(flags) == 0  # (the last --precision wins)
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    results, rows = report["results"], report["rows"]
    assert not [t for t, r in results.items() if "error" in r]
    tail = printed.strip().splitlines()[-len(rows) :]  # the table is the last thing printed
    assert [line.split()[0] for line in tail] == [r["part"].split()[0] for r in rows]
    assert {r["part"] for r in rows} == {"mlm", "seq2seq"}
    # Masked LM: the 3 timed steps of 8 blocks of 32 tokens on both sides.
    assert results["mlm_hf"]["tokens"] == results["mlm_ours"]["tokens"] == 3 * 8 * 32
    assert results["mlm_ours"]["command"][0] == "train.py"
    for part in ("mlm", "seq2seq"):
        hf, ours = results[f"{part}_hf"], results[f"{part}_ours"]
        row = next(r for r in rows if r["part"] == part and r["contestant"].startswith("ours"))
        expected = (ours["tokens"] / ours["seconds"]) / (hf["tokens"] / hf["seconds"])
        assert row["ratio"] == pytest.approx(expected)
        assert 0 <= row["data_wait"] < 1 and row["peak_mem_mib"] > 20
        assert hf["params"] > 0 and ours["params"] > 0
    assert "adamw_torch_fused" in printed and "learning_rate=0.002" in printed
    # bf16 asked for: HF's forward passes really ran under bf16 autocast, as ours did.
    assert results["mlm_hf"]["autocast"] and results["seq2seq_hf"]["autocast"]
    assert results["mlm_ours"]["precision"] == report["settings"]["precision"] == "bf16"


def test_prefetch_bench_runs_both_depths_and_reports_their_ratio(tmp_path, small_corpus, capsys):
    from conftest import TINY_FLAGS

    train_file, eval_file = small_corpus
    extra = [*TINY_FLAGS, "--eval-text", str(eval_file)]
    argv = ["--prefetch", "--streaming", "--corpus", str(train_file), "--steps", "12"]
    results = data_scale.main([*argv, "--workdir", str(tmp_path), "--", *extra])
    assert [r["prefetch"] for r in results] == [0, 2]
    for r in results:
        assert 0 <= r["data_wait"] < 1 and r["timed_tokens_per_s"] > 0
    ratio = results[1]["timed_tokens_per_s"] / results[0]["timed_tokens_per_s"]
    out = capsys.readouterr().out
    assert f"tokens/s with the thread / without: {ratio:.3f}" in out
    assert out.count("\n| ") == 3  # the header and one row per depth
