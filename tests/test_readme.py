"""The README's two commands stay true: the test command is what CI runs, and the main job
(``python train.py``) runs, here with a tiny shape and a small slice of the embedded corpus,
through the very function the command calls, ending with a fill-mask and a summary. The README
stays short enough to read in five minutes, and its links (and the docs' links) lead somewhere."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import ROOT, TINY_FLAGS

import train

MAIN_COMMAND = "pip install -e . && python train.py"
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest -q'


MAX_README_LINES = 200


def readme() -> str:
    return (ROOT / "README.md").read_text()


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_shows_both_commands():
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme(), re.S)
    lines = {line.strip() for block in blocks for line in block.splitlines()}
    assert MAIN_COMMAND in lines
    assert TEST_COMMAND in lines


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci
    assert TEST_COMMAND.replace("pip install -e", "pip install -q -e") in ci


def test_train_help_runs_as_a_command():
    out = subprocess.run(
        [sys.executable, "train.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--time-budget" in out.stdout


def test_main_job_on_the_embedded_corpus(tmp_path, capsys):
    """``python train.py`` is ``train.main([])``; the same call with a tiny shape and corpus."""
    out = tmp_path / "default"
    train.main(
        TINY_FLAGS + ["--corpus-max-chars", "1000000", "--max-steps", "6", "--output-dir", str(out)]
    )
    printed = capsys.readouterr().out
    assert "embedded corpus" in printed
    # Under 2,000 pairs (this corpus has a few hundred), gap sentences join the pairs, and the
    # pairs weigh their share of 1,500.
    assert re.search(r"objectives: masked_lm=0.25, gap_summary=1, summarize=0\.\d+ ", printed)
    assert "fill-mask:" in printed and "Return the [MASK] value of a number." in printed
    assert "reference summary:" in printed and "generated summary:" in printed
    assert (out / "model.safetensors").is_file()
    # The samples are the run's last job, timed inside it (and its budget).
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_seconds"] > 0 and (out / "samples.json").is_file()


def test_default_configuration_is_the_tiny_preset_on_everything():
    cfg = train.config_from_args([])
    assert cfg.model.preset == "tiny"
    assert cfg.data.train_text == [] and cfg.data.train_pairs == []  # the embedded corpus
    assert cfg.run.objectives == "auto"


def test_readme_is_short():
    assert len(readme().splitlines()) <= MAX_README_LINES


def test_links_of_the_readme_and_docs_lead_somewhere():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and anchor not in anchors(linked.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
