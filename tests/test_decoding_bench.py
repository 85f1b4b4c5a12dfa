"""bench/decoding.py: every combination is decoded and scored against the run's own options,
and the paired difference is the per-document one; bench/debian_pairs.py reads a package list."""

from __future__ import annotations

import json

import pytest
from conftest import load_bench

decoding = load_bench("decoding")


def test_paired_difference_is_the_mean_per_document_one():
    first = [{"rougeL": 10.0}, {"rougeL": 20.0}, {"rougeL": 30.0}]
    other = [{"rougeL": 12.0}, {"rougeL": 20.0}, {"rougeL": 34.0}]
    diff, error = decoding.paired(first, other)
    assert diff == pytest.approx(2.0)
    assert error == pytest.approx(2.0 / 3**0.5)  # stdev of (2, 0, 4) is 2


def test_every_combination_is_scored_against_the_runs_own(tiny_run, corpus_files, tmp_path, capsys):
    _, pairs = corpus_files
    out = tmp_path / "rows.json"
    own = json.loads((tiny_run / "generation_config.json").read_text())
    argv = [str(tiny_run), "--pairs", str(pairs), "--limit", "6", "--json", str(out)]
    argv += ["--length-penalty", str(own["length_penalty"]), "2"]
    argv += ["--no-repeat-ngram", "0", str(own["no_repeat_ngram_size"])]
    assert decoding.main(argv) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 + 2 * 2
    first = rows[0]
    assert first["run's own"] and first["vs_own"] == 0
    # The run's own options given explicitly decode the same summaries: the same scores.
    same = [
        r
        for r in rows[1:]
        if (r["length_penalty"], r["no_repeat_ngram_size"])
        == (own["length_penalty"], own["no_repeat_ngram_size"])
    ]
    assert len(same) == 1 and same[0]["rougeL"] == first["rougeL"] and same[0]["vs_own"] == 0
    for r in rows:
        assert r["vs_own"] == pytest.approx(r["rougeL"] - first["rougeL"], abs=1e-9)
    table = capsys.readouterr().out.rsplit("\n\n", 1)[-1]
    assert table.count("\n| ") == 1 + len(rows)  # the header and a row each, printed last


def test_debian_pairs_are_long_descriptions_and_synopses(tmp_path):
    debian = load_bench("debian_pairs")
    status = tmp_path / "status"
    status.write_text(
        "Package: alpha\nStatus: install ok installed\nDescription: tool for alpha things\n"
        " Alpha does one thing and does it well, on every\n machine it runs on.\n .\n"
        " A second paragraph.\nHomepage: https://example.org\n\n"
        "Package: beta\nDescription: too short\n Two words.\n\n"
        "Package: gamma\nDescription: no long description\n"
    )
    assert debian.read_status(status) == [
        (
            "Alpha does one thing and does it well, on every machine it runs on.\n"
            "A second paragraph.",
            "tool for alpha things",
        )
    ]
    assert debian.main(["--status", str(status), "--out", str(tmp_path / "out")]) == 0
    rows = [
        json.loads(line)
        for name in ("train.jsonl", "test.jsonl")
        for line in (tmp_path / "out" / name).read_text().splitlines()
    ]
    assert rows == [
        {"document": debian.read_status(status)[0][0], "summary": "tool for alpha things"}
    ]
