"""bench/compare.py: the side-by-side benchmark runs end to end at tiny sizes, both sides see
the same data and count tokens the same way, and every ratio comes from measured numbers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


compare = _load("bench_compare", "compare.py")
workers = _load("bench_workers", "_workers.py")

TINY = [
    "--vocab-size", "400", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2",
    "--ffn-size", "64", "--seq-len", "32", "--max-positions", "128", "--source-len", "64",
    "--target-len", "16", "--batch-size", "8", "--warmup", "2", "--steps", "3",
    "--seq2seq-warmup", "2", "--seq2seq-steps", "3", "--new-tokens", "6", "--gen-batch", "3",
    "--beams", "2", "--gen-repeats", "1", "--gen-rounds", "1", "--matmul-size", "128", "--device", "cpu",
    "--precision", "fp32", "--quality-seconds", "1", "--quality-blocks", "5",
]  # fmt: skip


def data_flags(corpus_files) -> list[str]:
    text_file, pairs = corpus_files
    return ["--train-text", str(text_file), "--train-pairs", str(pairs)]


# ---------------------------------------------------------------------------- same data


def test_blocks_are_exactly_our_masked_lm_blocks():
    from data.objectives.masked_lm import block, pack_blocks

    flat = np.arange(10, 10 + 100, dtype=np.int32)
    blocks = compare.mlm_blocks(flat, 8, cls=2)
    assert len(blocks) == pack_blocks(flat, 8) == 14
    for i in range(len(blocks)):
        assert np.array_equal(blocks[i], block(flat, i, 8, 2))


def test_both_sides_count_the_same_tokens(tokenizer):
    """The replayed count of our batch equals what the BART hook counts on the same pairs."""
    from transformers import DataCollatorForSeq2Seq

    from data.batching import Seq2SeqStream
    from data.tokenizer import special_ids

    ids = special_ids(tokenizer)
    rng = np.random.default_rng(0)
    sources = [rng.integers(10, 300, size=n) for n in (3, 40, 70, 12)]
    targets = [rng.integers(10, 300, size=n) for n in (2, 30, 5, 16)]
    s_len, t_len = 32, 8
    stream = Seq2SeqStream("summarize", sources, targets, ids, source_len=s_len, target_len=t_len)
    replay = compare.replay_seq2seq(stream, batch_size=4, seed=0, total=1)
    expected = sum(
        min(len(s), s_len - 2) + 2 + min(len(t), t_len - 1) + 1
        for s, t in zip(sources, targets, strict=True)
    )
    assert replay["real"] == [expected]
    assert replay["padded"][0] > replay["nonpad"][0]  # the batch holds padding, not counted

    hf_examples = [
        {
            "input_ids": compare.frame_source(s, ids.cls, ids.sep, s_len),
            "labels": [*(int(x) for x in t[: t_len - 1]), ids.sep],
        }
        for s, t in zip(sources, targets, strict=True)
    ]
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(hf_examples)
    hf_count = int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
    assert hf_count == expected


def test_generation_model_is_the_one_train_py_builds(tokenizer):
    import train
    from trainer.config import build_model_config

    shape = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_size": 64}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()] + ["--max-positions=96"]
    expected = build_model_config(train.config_from_args(flags), tokenizer)
    spec = {"shape": {**shape, "max_positions": 96}, "preset": "tiny"}
    assert workers._our_model_config(spec, tokenizer).to_dict() == expected.to_dict()


# ---------------------------------------------------------------------------- timing arithmetic


def test_timed_window_reads_train_metrics(tmp_path):
    lines = [
        {"step": 5, "tokens": 500, "tokens_per_s": 50.0, "data_wait": 0.5, "elapsed": 10.0},
        {"step": 10, "tokens": 1000, "tokens_per_s": 250.0, "data_wait": 0.1, "elapsed": 12.0},
        {"step": 10, "eval/masked_lm/loss": 3.0},
        {"step": 15, "tokens": 1500, "tokens_per_s": 500.0, "data_wait": 0.4, "elapsed": 13.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    window = workers.read_timed_window(path, 5, 15)
    assert window["seconds"] == pytest.approx(3.0)
    assert window["padded_tokens"] == 1000 and window["tokens_at_warmup"] == 500
    # Windows of 2 s (10% waiting) and 1 s (40%): 0.6 s of 3 s.
    assert window["data_wait"] == pytest.approx(0.2)
    with pytest.raises(RuntimeError, match="steps 5 and 20"):
        workers.read_timed_window(path, 5, 20)


def test_rows_compute_ratios_from_results():
    spec = {
        "shape": {
            "vocab_size": 448, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
            "ffn_size": 64, "max_positions": 128,
        },
        "mlm": {"seq_len": 32},
        "seq2seq": {"bart_layers": [1, 1]},
        "generate": {"modes": {"greedy": 1}},
        "ceiling": {"size": 128},
    }  # fmt: skip
    results = {
        "ceiling": {"flops_per_s": 1e10, "dtype": "float32"},
        "mlm_hf": {"tokens_per_s": 400.0, "params": 1, "peak_mem_mib": 10.0},
        "mlm_ours": {"tokens_per_s": 1000.0, "params": 1, "data_wait": 0.01},
        "seq2seq_hf": {"error": "exit status 1"},
        "seq2seq_ours": {
            "tokens_per_s": 300.0,
            "params": 1,
            "data_wait": 0.0,
            "flops_per_token": 2e6,
        },
        "generate_hf": {"modes": {"greedy": {"seconds_per_batch": 0.3}}},
        "generate_ours": {"modes": {"greedy": {"seconds_per_batch": 0.1}}},
    }
    rows = compare.build_rows(spec, results)
    by = {(r["part"], r["contestant"]): r for r in rows}
    assert by[("mlm", "ours train.py masked_lm")]["ratio"] == pytest.approx(2.5)
    flops = by[("mlm", "ours model FLOP/s")]
    per_token = compare.model_flops_per_token(spec)
    assert flops["value"] == pytest.approx(per_token * 1000.0)
    assert flops["fraction_of_ceiling"] == pytest.approx(per_token * 1000.0 / 1e10)
    # A failed contestant shows as failed and leaves no ratio behind.
    assert by[("seq2seq", "HF BART + Trainer")]["value"] is None
    assert by[("seq2seq", "ours train.py summarize")]["ratio"] is None
    # Summarization FLOP/s from the side's own counted FLOPs; none for the failed side.
    assert by[("seq2seq", "ours counted FLOP/s")]["value"] == pytest.approx(2e6 * 300.0)
    assert ("seq2seq", "HF counted FLOP/s") not in by
    assert by[("generate greedy", "ours model.generate")]["ratio"] == pytest.approx(3.0)
    table = compare.format_table(rows)
    assert "FAILED" in table and "2.50x" in table and "3.00x" in table


def test_repeated_runs_of_a_task_are_joined():
    """Generation runs A B B A; each side's two runs pool their timed calls, and a failed run
    shows as failed rather than being hidden by the other. The ceiling, read before and after
    masked LM, keeps the faster reading."""
    first = {"modes": {"greedy": {"times": [0.3, 0.1, 0.2], "seconds_per_batch": 0.2}},
             "peak_mem_mib": 50.0}  # fmt: skip
    second = {"modes": {"greedy": {"times": [0.4, 0.5, 0.6], "seconds_per_batch": 0.5}},
              "peak_mem_mib": 70.0}  # fmt: skip
    merged = compare.merge_runs(first, second)
    assert merged["modes"]["greedy"]["times"] == [0.3, 0.1, 0.2, 0.4, 0.5, 0.6]
    assert merged["modes"]["greedy"]["seconds_per_batch"] == pytest.approx(0.35)
    assert merged["peak_mem_mib"] == 70.0
    assert compare.merge_runs(None, first) is first
    failed = {"error": "exit status 1"}
    assert compare.merge_runs(first, failed) is failed
    assert compare.merge_runs(failed, second) is failed
    ceiling = {"flops_per_s": 1e12, "dtype": "bfloat16"}
    faster = compare.merge_runs(ceiling, {"flops_per_s": 2e12, "dtype": "bfloat16"})
    assert faster["flops_per_s"] == 2e12 and faster["readings"] == [1e12, 2e12]
    assert compare.merge_runs(faster, ceiling)["flops_per_s"] == 2e12
    assert compare.tasks_for(["mlm", "ceiling"]) == ["ceiling", "mlm_hf", "mlm_ours", "ceiling"]
    abba = ["generate_hf", "generate_ours", "generate_ours", "generate_hf"]
    assert compare.tasks_for(["generate"]) == abba
    assert compare.tasks_for(["generate"], gen_rounds=2) == abba * 2
    assert compare.tasks_for(["seq2seq"], train_rounds=3) == [
        "seq2seq_hf", "seq2seq_ours", "seq2seq_ours", "seq2seq_hf", "seq2seq_hf", "seq2seq_ours"
    ]  # fmt: skip


def test_repeated_training_runs_pool_tokens_and_seconds():
    """Two training runs of a side count as one of all their timed steps: 3,000 tokens in 2 s
    and 1,000 in 2 s are 1,000 tok/s, not the mean of 1,500 and 500 tok/s."""
    first = {"seconds": 2.0, "tokens": 3000, "tokens_per_s": 1500.0, "data_wait": 0.01,
             "padding_share": 0.1, "peak_mem_mib": 90.0}  # fmt: skip
    second = {"seconds": 2.0, "tokens": 1000, "tokens_per_s": 500.0, "data_wait": 0.03,
              "padding_share": 0.2, "peak_mem_mib": 80.0}  # fmt: skip
    merged = compare.merge_runs(first, second)
    assert merged["tokens_per_s"] == pytest.approx(1000.0)
    assert merged["runs"] == [1500.0, 500.0]
    assert merged["data_wait"] == pytest.approx(0.02)
    assert merged["padding_share"] == pytest.approx(0.125)
    assert merged["peak_mem_mib"] == 90.0
    third = compare.merge_runs(merged, {**second, "tokens_per_s": 700.0})
    assert third["runs"] == [1500.0, 500.0, 700.0] and third["seconds"] == 6.0


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


def test_our_peak_is_taken_when_training_ends(tmp_path, corpus_files):
    from conftest import TINY_FLAGS

    import train

    original = getattr(train, "write_training_curves", None)
    flags = TINY_FLAGS + data_flags(corpus_files) + ["--output-dir", str(tmp_path / "run")]
    memory = workers.train_ours(
        {"device": "cpu"}, flags + ["--max-steps", "2", "--objectives", "masked_lm=1"]
    )
    assert getattr(train, "write_training_curves", None) is original  # left as it was
    if original is not None:
        assert memory["peak_mem_mib"] > 0 and memory["mem_kind"].endswith("end of training")


def test_unreadable_data_is_a_clear_error(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"document": "a b c", "summary": "a"}\nnot json\n')
    flags = TINY + ["--train-pairs", str(bad), "--parts", "generate"]
    with pytest.raises(SystemExit, match="pairs.jsonl"):
        compare.main(flags)


# ---------------------------------------------------------------------------- end to end


def test_benchmark_runs_every_part_and_reports_measured_ratios(tmp_path, corpus_files, capsys):
    pytest.importorskip("accelerate", reason="HF Trainer needs accelerate (pip install .[bench])")
    out = tmp_path / "bench.json"
    flags = TINY + data_flags(corpus_files) + ["--json", str(out), "--in-process"]
    flags += ["--precision", "bf16"]  # the last --precision wins
    assert compare.main(flags) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    results, rows = report["results"], report["rows"]
    assert not [t for t, r in results.items() if "error" in r]
    # Contestants that shared this process have no peak of their own to report.
    assert not [t for t, r in results.items() if "peak_mem_mib" in r]

    # The table is the last thing printed, one line per row.
    tail = printed.strip().splitlines()[-len(rows) :]
    assert [line.split()[0] for line in tail] == [r["part"].split()[0] for r in rows]

    parts = {(r["part"], r["contestant"]) for r in rows}
    assert {p for p, _ in parts} == {
        "mlm", "seq2seq", "generate greedy", "generate beam 2", "quality", "ceiling",
    }  # fmt: skip
    for task in ("mlm_hf", "mlm_ours", "seq2seq_hf", "seq2seq_ours"):
        r = results[task]
        assert r["seconds"] > 0 and r["tokens"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    # Masked LM: 3 timed steps of 8 blocks of 32 tokens, twice on each side (--train-rounds 2,
    # the second run in a fresh folder, not resuming the first).
    assert results["mlm_hf"]["tokens"] == results["mlm_ours"]["tokens"] == 2 * 3 * 8 * 32
    for task in ("mlm_hf", "mlm_ours", "seq2seq_hf", "seq2seq_ours"):
        assert len(results[task]["runs"]) == 2
    for part in ("mlm", "seq2seq"):
        ours = next(r for r in rows if r["part"] == part and r["contestant"].startswith("ours"))
        expected = results[f"{part}_ours"]["tokens_per_s"] / results[f"{part}_hf"]["tokens_per_s"]
        assert ours["ratio"] == pytest.approx(expected)
        assert 0 <= ours["data_wait"] < 1
    # Summarization FLOP/s: each side's counted FLOPs per token times its speed.
    for side, name in (("hf", "HF"), ("ours", "ours")):
        result = results[f"seq2seq_{side}"]
        r = next(r for r in rows if r["contestant"] == f"{name} counted FLOP/s")
        assert r["flops_per_token"] == result["flops_per_token"] > 0
        assert r["value"] == pytest.approx(result["flops_per_token"] * result["tokens_per_s"])
    for mode in ("greedy", "beam 2"):
        hf, ours = results["generate_hf"]["modes"][mode], results["generate_ours"]["modes"][mode]
        assert hf["new_tokens"] == ours["new_tokens"] == [6, 6, 6]  # equal work on both sides
        assert len(hf["times"]) == len(ours["times"]) == 2  # --gen-repeats 1, two runs a side
        row = next(r for r in rows if r["part"] == f"generate {mode}" and r.get("ratio"))
        assert row["ratio"] == pytest.approx(hf["seconds_per_batch"] / ours["seconds_per_batch"])
    assert results["ceiling"]["flops_per_s"] > 0
    # Equal time: each side ran the steps its measured speed fits into --quality-seconds, and
    # both were scored on the same 5 held-out blocks.
    for side in ("hf", "ours"):
        speed = results[f"mlm_{side}"]["tokens_per_s"]
        q = results[f"quality_{side}"]
        assert q["steps"] == max(1, round(1 * speed / (8 * 32)))
        assert q["train_tokens"] == q["steps"] * 8 * 32
        assert 0 < q["heldout_loss"] < 2 * np.log(400)  # nats; log(vocab) is a uniform guess
    assert report["spec"]["quality"]["steps"] == {
        side: results[f"quality_{side}"]["steps"] for side in ("hf", "ours")
    }
    assert "learning_rate=0.002" in printed and "adamw_torch_fused" in printed
    # bf16 asked for: HF's forward passes really ran under bf16 autocast, as ours did.
    for task in ("mlm_hf", "seq2seq_hf"):
        assert results[task]["hf_config"]["autocast_seen"] == "bfloat16"
    assert report["settings"]["precision"] == "bf16"
    ours_flags = results["mlm_ours"]["flags"]
    assert ours_flags[ours_flags.index("--precision") + 1] == "bf16"


def test_contestants_in_their_own_process_report_their_own_peak(tmp_path, corpus_files):
    out = tmp_path / "bench.json"
    flags = TINY + data_flags(corpus_files) + ["--parts", "ceiling", "--json", str(out)]
    assert compare.main(flags) == 0
    result = json.loads(out.read_text())["results"]["ceiling"]
    assert result["peak_mem_mib"] > 20  # a fresh interpreter holding torch
    status = Path("/proc/self/status")
    if status.is_file():
        assert result["mem_kind"] == "peak RSS (VmHWM)"
        # This process holds transformers, datasets and the prepared data; a contestant that
        # only imports torch peaks far below it. (ru_maxrss would inherit this process's peak.)
        ours = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        assert result["peak_mem_mib"] < 0.8 * int(ours.split()[1]) / 1024


def test_levers_time_every_variant_against_the_defaults():
    levers = _load("bench_levers", "levers.py")
    args = levers.build_parser().parse_args(
        "--rounds 1 --steps 1 --batch-size 2 --seq-len 16 --source-len 40 --target-len 8 "
        "--hidden-size 32 --num-layers 2 --num-heads 2 --ffn-size 64 --vocab-size 200".split()
    )
    rows = levers.run(args)
    seen = {(r["objective"], r["variant"]) for r in rows}
    assert seen == {("masked_lm", v) for v in levers.VARIANTS if v != "exact lengths"} | {
        ("summarize", v) for v in levers.VARIANTS
    }
    assert all(r["tokens_per_s"] > 0 for r in rows)
    base = {r["objective"]: r["tokens_per_s"] for r in rows if r["variant"] == "defaults"}
    for r in rows:
        assert r["vs_defaults"] == pytest.approx(r["tokens_per_s"] / base[r["objective"]])
    with pytest.raises(SystemExit, match="unknown"):
        levers.run(levers.build_parser().parse_args(["--variants", "bogus"]))
