"""What the default job ends with: fill-mask guesses on a few sentences and one held-out
document's summary, made from the run folder as a user loads it (``model.load``) and saved as
RUN/samples.json. They are the run's last job, inside its time budget."""

from __future__ import annotations

import json
from pathlib import Path

from model.files import atomic_write_text

SAMPLE_MASKS = (
    "Return the [MASK] value of a number.",
    "Raise a [MASK] if the file does not exist.",
    "The list is [MASK] in place.",
)


def write_samples(folder: Path, eval_pairs, tasks: dict | None = None) -> dict:
    """Fill-mask predictions and one held-out document's summary, saved as samples.json; with
    named tasks (``tasks``: name -> held-out pairs), one held-out output of each too."""
    import model as api

    lm = api.load(folder)
    samples: dict = {"fill_mask": [], "summary": None}
    for text in SAMPLE_MASKS:
        best = lm.fill_mask(text, top_k=3)
        samples["fill_mask"].append(
            {"text": text, "predictions": [[p["token"].strip(), p["score"]] for p in best]}
        )
    if len(eval_pairs):
        document, reference = eval_pairs[0]
        generated = lm.summarize(document)  # decoded as the run's generation_config.json says
        samples["summary"] = {"document": document, "reference": reference, "generated": generated}
    for name, pairs in (tasks or {}).items():
        if len(pairs):
            source, reference = pairs[0]
            generated = lm.generate(source, task=name)  # as its generation_config.json entry says
            samples.setdefault("tasks", {})[name] = {
                "source": source, "reference": reference, "generated": generated
            }  # fmt: skip
    atomic_write_text(folder / "samples.json", json.dumps(samples, indent=1))
    return samples


def print_samples(samples: dict) -> None:
    """What the README's first command ends with: a few fill-masks and a held-out summary."""
    print("\nfill-mask:")
    for item in samples["fill_mask"]:
        shown = ", ".join(f"{token} ({score:.2f})" for token, score in item["predictions"])
        print(f"  {item['text']}\n    -> {shown}")
    summary = samples.get("summary")
    if summary:
        doc = summary["document"]
        short = doc if len(doc) < 400 else doc[:400] + " ..."
        print(f"\nheld-out document:\n  {short}")
        print(f"reference summary:\n  {summary['reference']}")
        print(f"generated summary:\n  {summary['generated']}")
    for name, sample in samples.get("tasks", {}).items():
        source = sample["source"]
        short = source if len(source) < 200 else source[:200] + " ..."
        print(f"\ntask {name}, held-out source:\n  {short}")
        print(f"reference:\n  {sample['reference']}\ngenerated:\n  {sample['generated']}")
