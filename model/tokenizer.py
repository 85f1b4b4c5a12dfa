"""The tokenizer as a trained model uses it: loading a ``tokenizer.json``, its special tokens,
and the check that tokenizer and model config agree. (Training one is ``data.vocab``.)

Every tokenizer we use carries the same special tokens, which the objectives rely on:

    pad  [PAD]        padding
    unk  [UNK]        unknown
    cls  [CLS]        start of every sequence (also bos)
    sep  [SEP]        end of a segment / sequence (also eos)
    mask [MASK]       a hidden word (masked LM); absorbs the space before it
    sentence_mask [MASK_SENT]  a hidden sentence (gap-sentence generation)

A loaded tokenizer that lacks some of them (say a RoBERTa one with ``<mask>``) keeps its own
names where a common alias exists and gains the missing ones as added special tokens.

A run trained on named text-to-text tasks (``--train-pairs title=titles.jsonl``) also has one
special token per task, ``[TASK:title]``, which stands in front of that task's source. The task
``summarize`` has none: its source is the bare ``[CLS] source [SEP]`` of every run, so a run
with no named task has exactly the tokenizer it always had.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from model.config import MiniTuringConfig, round_vocab

SPECIAL_TOKENS = {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
    "sentence_mask": "[MASK_SENT]",
}
# Other spellings of the same roles, so an existing BERT/RoBERTa tokenizer.json can be used.
ALIASES = {
    "pad": ["[PAD]", "<pad>"],
    "unk": ["[UNK]", "<unk>"],
    "cls": ["[CLS]", "<s>", "<cls>", "<|startoftext|>"],
    "sep": ["[SEP]", "</s>", "<sep>", "<|endoftext|>"],
    "mask": ["[MASK]", "<mask>"],
    "sentence_mask": ["[MASK_SENT]", "<mask_1>", "<mask_sent>"],
}


# The task whose source carries no task token: what every run's pairs train.
DEFAULT_TASK = "summarize"
# A task's name: a lowercase identifier, so that it reads as a flag value, a metrics key and a
# token alike.
TASK_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_TASK_TOKEN = re.compile(r"\[TASK:([a-z][a-z0-9_]{0,31})\]")


def task_token(name: str) -> str:
    """The special token in front of a named task's source: ``[TASK:name]``."""
    return f"[TASK:{name}]"


def task_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The named tasks a tokenizer has a token for, name -> token id, in id order."""
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    found = {m.group(1): i for t, i in vocab.items() if (m := _TASK_TOKEN.fullmatch(t))}
    return dict(sorted(found.items(), key=lambda item: item[1]))


def with_task_tokens(
    tokenizer: PreTrainedTokenizerFast, names: list[str]
) -> PreTrainedTokenizerFast:
    """``tokenizer`` with a special token for each named task (``summarize`` has none) that it
    lacks, appended after its last entry in the order given; the same object when it lacks
    none."""
    have = task_ids(tokenizer)
    missing = [n for n in dict.fromkeys(names) if n != DEFAULT_TASK and n not in have]
    if not missing:
        return tokenizer
    raw = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    raw.add_special_tokens([AddedToken(task_token(n), special=True, normalized=False)
                            for n in missing])  # fmt: skip
    return wrap(raw)


class TokenizerError(ValueError):
    """A tokenizer that cannot serve the model or the objectives."""


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int
    sentence_mask: int

    def as_list(self) -> list[int]:
        return [self.pad, self.unk, self.cls, self.sep, self.mask, self.sentence_mask]


def added_token(role: str, content: str) -> AddedToken:
    # The mask swallows the space to its left, so "the [MASK] value" tokenizes like a real
    # word in that slot (byte-level words carry their leading space).
    return AddedToken(content, special=True, normalized=False, lstrip=role == "mask")


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Give a raw ``tokenizers`` object our special tokens and the transformers interface."""
    vocab = tok.get_vocab(with_added_tokens=True)
    names = {}
    for role, aliases in ALIASES.items():
        found = next((a for a in aliases if a in vocab), None)
        if found is None:
            found = SPECIAL_TOKENS[role]
            tok.add_special_tokens([added_token(role, found)])
        names[role] = found
    cls_id, sep_id = tok.token_to_id(names["cls"]), tok.token_to_id(names["sep"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{names['cls']} $A {names['sep']}",
        pair=f"{names['cls']} $A {names['sep']} $B:1 {names['sep']}:1",
        special_tokens=[(names["cls"], cls_id), (names["sep"], sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=names["pad"],
        unk_token=names["unk"],
        cls_token=names["cls"],
        sep_token=names["sep"],
        bos_token=names["cls"],
        eos_token=names["sep"],
        mask_token=names["mask"],
        extra_special_tokens={"sentence_mask_token": names["sentence_mask"]},
        model_input_names=["input_ids", "attention_mask"],
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a ``tokenizer.json`` file, or a folder that holds one (a run folder, say)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(
            f"no tokenizer at {path}: expected a tokenizer.json file or a folder holding one"
        )
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises plain Exceptions
        raise TokenizerError(f"{file} is not a valid tokenizer.json: {err}") from None
    return wrap(tok)


def special_ids(tokenizer: PreTrainedTokenizerFast) -> SpecialIds:
    return SpecialIds(
        pad=tokenizer.pad_token_id,
        unk=tokenizer.unk_token_id,
        cls=tokenizer.cls_token_id,
        sep=tokenizer.sep_token_id,
        mask=tokenizer.mask_token_id,
        sentence_mask=tokenizer.convert_tokens_to_ids(tokenizer.sentence_mask_token),
    )


def tokenizer_fields(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The MiniTuringConfig fields a tokenizer decides: the embedding rows (its size rounded up
    to a multiple of 64) and the special-token ids."""
    ids = special_ids(tokenizer)
    tasks = task_ids(tokenizer)
    return dict(
        # Only a tokenizer with task tokens sets the field (a run without is as it always was).
        **({"task_tokens": tasks} if tasks else {}),
        vocab_size=round_vocab(len(tokenizer)),
        tokenizer_size=len(tokenizer),
        pad_token_id=ids.pad,
        unk_token_id=ids.unk,
        bos_token_id=ids.cls,
        eos_token_id=ids.sep,
        mask_token_id=ids.mask,
        sentence_mask_token_id=ids.sentence_mask,
    )


def model_config(tokenizer: PreTrainedTokenizerFast, **fields) -> MiniTuringConfig:
    """A model config sized for ``tokenizer``; ``fields`` holds the other MiniTuringConfig fields."""
    return MiniTuringConfig(**tokenizer_fields(tokenizer), **fields)


def check_compatible(tokenizer: PreTrainedTokenizerFast, config, where: str = "") -> None:
    """Refuse a model config and tokenizer that disagree, naming the mismatch."""
    place = f" in {where}" if where else ""
    n = len(tokenizer)
    problems = []
    if n > config.vocab_size:
        problems.append(
            f"the tokenizer has {n} entries but the model's embedding has only {config.vocab_size} rows"
        )
    if config.tokenizer_size is not None and config.tokenizer_size != n:
        problems.append(
            f"config says the tokenizer has {config.tokenizer_size} entries, it has {n}"
        )
    ids = special_ids(tokenizer)
    expected = {
        "pad_token_id": ids.pad,
        "unk_token_id": ids.unk,
        "bos_token_id": ids.cls,
        "eos_token_id": ids.sep,
        "mask_token_id": ids.mask,
        "sentence_mask_token_id": ids.sentence_mask,
    }
    for name, value in expected.items():
        if getattr(config, name, None) != value:
            problems.append(
                f"config {name}={getattr(config, name, None)} but the tokenizer's is {value}"
            )
    tasks, recorded = task_ids(tokenizer), getattr(config, "task_tokens", None) or {}
    if tasks != recorded:
        problems.append(f"config task_tokens={recorded} but the tokenizer's are {tasks}")
    if problems:
        raise TokenizerError(f"tokenizer and model config disagree{place}: " + "; ".join(problems))
