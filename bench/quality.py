"""Quality at equal wall-clock time: minituring against Hugging Face models trained from scratch
on the same data, on this machine, for the same time.

    python -m bench.quality --minutes 10
    python -m bench.quality --minutes 2 --test-limit 40 --json quality.json
    python -m bench.quality --pairs train.jsonl --test-pairs test.jsonl --text docs.txt

Ours is ``train.py --time-budget``, HF BART and BERT ``bench/hf.py``; docs/performance.md
("How the race counts") says what each budget covers and how the cloze words are chosen.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import hf
from bench.common import run_train
from trainer.evaluate import rouge, rouge_scores

MASK = "[MASK]"
CONTEXT_WORDS = 40  # about 60-100 tokens: inside both models' masked-LM block (128)
SHAPE_FLAGS = ("hidden_size", "num_layers", "num_heads", "ffn_size", "seq_len", "vocab_size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add = p.add_argument
    add("--minutes", type=float, default=10, help="training time of each contestant")
    add("--seed", type=int, default=0)
    add("--test-limit", type=int, default=None, help="test pairs and cloze texts (default: all)")
    add("--bart-lr", type=float, default=5e-4, help="BART's peak learning rate")
    add("--bert-lr", type=float, default=5e-4, help="BERT's peak learning rate")
    add("--batch-size", type=int, default=32, help="both HF trainers (ours: 32)")
    add("--hf-dropout", type=float, default=None, help="BART's and BERT's (default: train.py's)")
    add("--hf-attention-dropout", type=float, default=None, help="theirs (default: train.py's)")
    add("--bart-label-smoothing", type=float, default=None, help="(default: train.py's)")
    add("--max-new-tokens", type=int, default=48, help="summary length cap, both")
    add("--skip-hf", action="store_true", help="no BART or BERT")
    add("--skip-mlm", action="store_true", help="no BERT and no cloze test")
    add("--skip-ours", action="store_true", help="HF side and baselines only")
    add("--ours-flags", default="", metavar="FLAGS", help="more train.py flags for ours, one quoted string (e.g. '--dropout 0.1')")  # fmt: skip
    data = p.add_argument_group("data (default: the embedded corpus and its held-out split)")
    data.add_argument("--pairs", nargs="+", default=[], help="training document/summary pairs")
    data.add_argument("--test-pairs", nargs="+", default=[], help="test pairs (with --pairs)")
    data.add_argument("--text", nargs="+", default=[], help="training text (masked LM)")
    data.add_argument("--test-text", nargs="+", default=[], help="cloze texts (with --text)")
    shape = p.add_argument_group("shape overrides, both sides (default: our tiny preset)")
    for name in SHAPE_FLAGS:
        shape.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    add("--json", default=None, metavar="OUT", help="write the results here")
    add("--workdir", default=None, help="keep run folders here (default: a temp dir)")
    return p


def lead(document: str, n: int) -> str:
    return " ".join(document.split()[:n])


def oracle(document: str, reference: str) -> str:
    """The contiguous window of the document's words, as many as the reference has, with the
    highest ROUGE-L F-measure against the reference (the first such window on ties)."""
    words, n = document.split(), max(len(reference.split()), 1)
    windows = [" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))]
    return max(windows, key=lambda w: rouge_scores(w, reference)[2])


def baselines(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    return {
        "lead-N (N = reference words)": [lead(d, len(s.split())) for d, s in pairs],
        "lead-10": [lead(d, 10) for d, _ in pairs],
        "oracle window (best ROUGE-L)": [oracle(d, s) for d, s in pairs],
    }


def single_token(tokenizer, word: str) -> bool:
    return len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1


def cloze_items(texts: list[str], fits, seed: int, limit: int | None = None) -> list:
    """(text with one word replaced by [MASK], the word) for each text that has a candidate (see
    docs/performance.md). ``fits(word)``: the word is one token for every contestant."""
    items = []
    for i, text in enumerate(texts):
        spans = list(re.finditer(r"\S+", text))[:CONTEXT_WORDS]
        if len(spans) < 2:
            continue
        context = text[: spans[-1].end()]
        candidates = [m for m in spans[1:] if m.group().isalpha() and context[m.start() - 1] == " "]
        random.Random(f"{seed}:{i}").shuffle(candidates)
        chosen = next((m for m in candidates if fits(m.group())), None)
        if chosen is not None:
            masked = context[: chosen.start()] + MASK + context[chosen.end() :]
            items.append((masked, chosen.group()))
            if limit and len(items) >= limit:
                break
    return items


def accuracy(predicted: list[str], words: list[str]) -> float:
    return 100 * sum(p == w for p, w in zip(predicted, words, strict=True)) / max(len(words), 1)


def load_data(args: argparse.Namespace):
    """The same split train.py makes from the same flags (data.raw.load_raw)."""
    from data.config import DataConfig
    from data.raw import load_raw

    cfg = DataConfig(train_text=list(args.text), train_pairs=list(args.pairs),
                     eval_text=list(args.test_text), eval_pairs=list(args.test_pairs))  # fmt: skip
    return load_raw(cfg), cfg


def our_flags(args: argparse.Namespace, seconds: float) -> list[str]:
    flags = ["--time-budget", f"{seconds:g}", "--seed", str(args.seed), "--no-progress"]
    for flag, values in (("--train-text", args.text), ("--train-pairs", args.pairs),
                         ("--eval-text", args.test_text), ("--eval-pairs", args.test_pairs)):  # fmt: skip
        if values:
            flags += [flag, *values]
    for name in SHAPE_FLAGS:
        if getattr(args, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return [*flags, *shlex.split(args.ours_flags)]


def run_ours(args, seconds, work, test_pairs) -> tuple[dict, object]:
    """train.py as a user runs it, in its own process, its output echoed as progress; then
    ``model.load`` of its run summarizes the test documents."""
    import model

    s = run_train(our_flags(args, seconds), work / "ours", echo="  ours")
    info = {"run": str(work / "ours"), "steps": s["steps"],
            "train_seconds": s["elapsed"] - s["data_seconds"], "prep_seconds": s["data_seconds"],
            "total_seconds": s["wall_s"], "command": s["command"]}  # fmt: skip
    lm = model.load(info["run"])
    info["params"] = sum(p.numel() for p in lm.model.parameters())
    if test_pairs:
        print(f"[quality] ours: summarizing {len(test_pairs)} test documents", flush=True)
        summaries = lm.summarize([d for d, _ in test_pairs], num_beams=4,
                                 max_new_tokens=args.max_new_tokens, no_repeat_ngram_size=3)  # fmt: skip
        info.update(rouge(summaries, [s for _, s in test_pairs]), summaries=summaries)
    return info, lm


def our_fill(lm, texts: list[str], batch_size: int = 32) -> list[str]:
    out = []
    for i in range(0, len(texts), batch_size):
        out += [r[0]["token"].strip() for r in lm.fill_mask(texts[i : i + batch_size], top_k=1)]
    return out


def hf_regularisation(args: argparse.Namespace) -> dict:
    """BART's and BERT's dropout and attention dropout and BART's label smoothing: the flags,
    else what train.py's defaults give ours."""
    from trainer.config import TrainConfig, build_model_config

    cfg = TrainConfig()
    ours = build_model_config(cfg)
    chosen = (args.hf_dropout, args.hf_attention_dropout, args.bart_label_smoothing)
    defaults = (ours.dropout, ours.attention_dropout, cfg.optim.label_smoothing)
    names = ("dropout", "attention_dropout", "label_smoothing")
    return {n: d if c is None else c for n, c, d in zip(names, chosen, defaults, strict=True)}


def run_hf(args, seconds, raw, cfg, shape, test_pairs) -> dict:
    reg = hf_regularisation(args)
    start = time.perf_counter()
    # The HF side takes plain lists, as a script written for it would (our tables are
    # memory-mapped and read batch by batch).
    texts, pairs = list(raw.train_texts), [tuple(p) for p in raw.train_pairs]
    tokenizer = hf.train_tokenizer(texts + [d for d, _ in pairs], shape["vocab_size"])
    tok_seconds = time.perf_counter() - start
    print(f"[quality] HF tokenizer: {len(tokenizer)} entries in {tok_seconds:.0f}s", flush=True)

    def contest(kind: str, name: str, make_data, what: str, train, lr: float, **kw):
        """Data prepared, the model built and trained for what is left of the budget."""
        start = time.perf_counter()
        data = make_data()
        prep = tok_seconds + time.perf_counter() - start
        model = hf.build(kind, shape, tokenizer, args.seed, reg["dropout"], reg["attention_dropout"])  # fmt: skip
        print(f"[quality] {name}: {model.num_parameters() / 1e6:.2f}M params, {len(data)} {what}, "
              f"lr {lr:g}, {seconds:g}s", flush=True)  # fmt: skip
        info = train(model, data, tokenizer, max(seconds - prep, 1.0), lr, args.seed, args.batch_size, **kw)  # fmt: skip
        info.update(params=model.num_parameters(), prep_seconds=prep, lr=lr)
        return model, {**info, "total_seconds": prep + info["train_seconds"]}

    results: dict = {"tokenizer": tokenizer}
    if pairs:
        bart, info = contest(
            "bart", f"BART {hf.bart_layers(shape['num_layers'])}",
            lambda: hf.seq2seq_data(pairs, tokenizer, cfg.source_len, cfg.target_len),
            "pairs", hf.train_bart, args.bart_lr, label_smoothing=reg["label_smoothing"],
        )  # fmt: skip
        if test_pairs:
            print(f"[quality] BART: summarizing {len(test_pairs)} test documents", flush=True)
            summaries = hf.bart_summarize(
                bart, tokenizer, [d for d, _ in test_pairs], num_beams=4,
                max_new_tokens=args.max_new_tokens, source_len=cfg.source_len,
                no_repeat_ngram_size=3,
            )  # fmt: skip
            info.update(rouge(summaries, [s for _, s in test_pairs]), summaries=summaries)
        results["bart"] = info
        del bart
    if raw.train_texts and not args.skip_mlm:
        bert, info = contest(
            "bert", "BERT", lambda: hf.mlm_blocks(texts, tokenizer, shape["seq_len"]),
            f"blocks of {shape['seq_len']}", hf.train_bert, args.bert_lr,
        )  # fmt: skip
        results["bert"] = {**info, "model": bert}
    return results


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text()
                   .splitlines() if x.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"nproc {os.cpu_count()}, {cpu}, load average {load:.1f}"


def format_table(rows: list[dict]) -> str:
    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| contestant | ROUGE-1 | ROUGE-2 | ROUGE-L | cloze accuracy | steps | wall-clock used |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['name']} | FAILED: {r['error'][:60]} | | | | | |")
            continue
        clock = "-"
        if r.get("train_seconds") is not None:
            clock = f"{r['train_seconds']:.0f}s training + {r['prep_seconds']:.0f}s data prep, "
            clock += f"{r['total_seconds']:.0f}s in all"
        lines.append(f"| {r['name']} | {num(r.get('rouge1'))} | {num(r.get('rouge2'))} | "
                     f"{num(r.get('rougeL'))} | {num(r.get('cloze'), '{:.1f}%')} | "
                     f"{num(r.get('steps'), '{}')} | {clock} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.test_pairs and not args.pairs) or (args.test_text and not args.text):
        raise SystemExit("error: --test-pairs needs --pairs, --test-text needs --text")
    if args.minutes <= 0:
        raise SystemExit("error: --minutes must be > 0")
    from model.config import PRESETS

    seconds = 60 * args.minutes
    shape = {**PRESETS["tiny"](), "vocab_size": 8192, "max_positions": 512}
    shape.update({k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None})
    command = "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="minituring-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print("[quality] loading data", flush=True)
        raw, cfg = load_data(args)
        test_pairs = [tuple(p) for p in raw.eval_pairs][: args.test_limit]
        print(f"[quality] {raw.description}; {len(test_pairs)} test pairs", flush=True)
        rows: list[dict] = []
        for name, predictions in baselines(test_pairs).items() if test_pairs else ():
            rows.append({"name": name, **rouge(predictions, [s for _, s in test_pairs])})
        lm = ours = theirs = None
        if not args.skip_ours:
            print(f"[quality] ours: train.py for {seconds:g}s of training", flush=True)
            try:
                ours, lm = run_ours(args, seconds, work, test_pairs)
                rows.append({"name": f"ours train.py ({ours['params'] / 1e6:.2f}M params)", **ours})
            except Exception as err:  # one failing contestant must not hide the others
                rows.append({"name": "ours train.py", "error": f"{type(err).__name__}: {err}"})
        if not args.skip_hf:
            try:
                theirs = run_hf(args, seconds, raw, cfg, shape, test_pairs)
            except Exception as err:
                rows.append({"name": "HF", "error": f"{type(err).__name__}: {err}"})
        for key, label in (("bart", "HF BART {}M + Seq2SeqTrainer"), ("bert", "HF BERT {}M + Trainer")):  # fmt: skip
            if theirs and key in theirs:
                rows.append({"name": label.format(f"{theirs[key]['params'] / 1e6:.2f}"), **theirs[key]})  # fmt: skip
        # The cloze test, over words that are one token for every model that takes it.
        fill = {}
        if lm is not None and raw.train_texts and not args.skip_mlm:
            fill["ours"] = (lm.tokenizer, lambda texts: our_fill(lm, texts))
        if theirs and "bert" in theirs:
            tok, bert = theirs["tokenizer"], theirs["bert"]["model"]
            fill["bert"] = (tok, lambda texts: hf.bert_fill(
                bert, tok, [t.replace(MASK, tok.mask_token) for t in texts]))  # fmt: skip
        items = []
        if fill and raw.eval_texts:
            fits = lambda word: all(single_token(t, word) for t, _ in fill.values())  # noqa: E731
            items = cloze_items(list(raw.eval_texts), fits, args.seed, args.test_limit)
            print(f"[quality] cloze: {len(items)} held-out texts, one word masked each", flush=True)
            for key, (_, predict) in fill.items():
                row = next(r for r in rows if r["name"].startswith({"ours": "ours", "bert": "HF BERT"}[key]))  # fmt: skip
                row["cloze"] = accuracy(predict([t for t, _ in items]), [w for _, w in items])
        reg = hf_regularisation(args)
        notes = [  # what docs/performance.md explains at length ("How the race counts")
            f"shape {shape['num_layers']} layers x {shape['hidden_size']}, {shape['num_heads']} heads, "
            f"FFN {shape['ffn_size']}, vocabulary {shape['vocab_size']}, masked-LM block {shape['seq_len']}: "
            "ours and BERT; BART the same width, its layers split between encoder and decoder",
            f"test: {len(test_pairs)} held-out pairs, ROUGE F x100 (rouge_score, stemmer), beam 4, no "
            f"repeated trigram, at most {args.max_new_tokens} new tokens; cloze: {len(items)} held-out "
            f"texts (first {CONTEXT_WORDS} words, one single-token word masked, top-1 exact match)",
            f"budget {seconds:g}s of preparation and training on each side, test decoding not counted; "
            f"BART lr {args.bart_lr:g}, BERT lr {args.bert_lr:g}, train.py's schedule, HF AdamW "
            f"defaults, dropout {reg['dropout']:g}, attention dropout {reg['attention_dropout']:g}, "
            f"BART label smoothing {reg['label_smoothing']:g}, batch {args.batch_size}",
        ]  # fmt: skip
        dropped = ("model", "summaries") + (("run",) if args.workdir is None else ())
        rows_out = [{k: v for k, v in r.items() if k not in dropped} for r in rows]
        if args.json:
            report = {"command": command, "date": date, "machine": machine(), "notes": notes,
                      "shape": shape, "seconds": seconds, "rows": rows_out,
                      "examples": [{"document": d[:500], "reference": s,
                                    **{r["name"]: r["summaries"][i] for r in rows if "summaries" in r}}
                                   for i, (d, s) in enumerate(test_pairs[:10])]}  # fmt: skip
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print()
        print("\n".join(notes))
        print(f"{date} | {machine()} | {command}")
        print(format_table(rows))
        return 1 if any(r.get("error") for r in rows) else 0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
