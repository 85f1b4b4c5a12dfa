"""``--init-from FOLDER``: a new run that starts from another run's weights and tokenizer, as
``from_pretrained`` does. The parent is a run folder, or any folder that ``model.load`` reads
(config.json, model.safetensors, tokenizer.json). The child has its own data, objectives,
schedule, output folder and a fresh optimizer; its model is the parent's.

The parent's model options are the child's defaults. Those that decide the weights (``FIXED``:
their shapes, the function they were trained to compute, the tokenizer they index) may be
given only with the parent's value; the others (``FREE``) may differ. The child's config.json
and summary.json record the parent's path and the SHA-256 of its weights file. A resumed child
continues from its own checkpoints and never reads the parent again.

A child may train named tasks its parent never saw (``--train-pairs title=...``): their tokens
are appended to the parent's tokenizer, and the embedding gains their rows (``extended``), each
the mean of the embeddings of the parent's ordinary tokens, a word-like start that attends and
is attended to like text; every other weight, and the parent's rows, are the parent's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from model.api import RunFolderError, checked_weights, matching_weights
from model.config import MiniTuringConfig
from model.tokenizer import TokenizerError, check_compatible, load_tokenizer, task_ids
from trainer.checkpoint import WEIGHT_FIELDS, model_differences
from trainer.errors import TrainingError

PARENT_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# FIXED model options decide the weights: a flag giving another value than the parent's is
# refused. FREE options (by group) leave the weights as they are (lengths within the positions,
# regularization, speed): the parent's unless given. Each is the parent's config.json field of
# the same name, but for CONFIG_FIELD's.
FIXED = ("preset", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_positions",
         "copy_attention", "hidden_act", "position", "norm", "bias", "ffn", "qk_norm")  # fmt: skip
FREE = {
    "model": ("seq_len", "dropout", "attention_dropout", "attention", "sparse_outputs",
              "chunked_loss", "zero_init_proj"),
    "data": ("source_len", "target_len"),
}  # fmt: skip
CONFIG_FIELD = {"max_positions": "max_position_embeddings"}


def parent_config(folder: Path) -> MiniTuringConfig:
    """The parent's model config, once the folder is known to hold what ``model.load`` reads."""
    if not folder.is_dir():
        raise TrainingError(f"--init-from {folder}: no such folder (expected a run folder)")
    for name in PARENT_FILES:
        if not (folder / name).is_file():
            raise TrainingError(
                f"--init-from {folder}: {name} is missing there (a parent folder holds "
                f"{', '.join(PARENT_FILES)}, as a run folder does)"
            )
    try:
        return MiniTuringConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise TrainingError(
            f"--init-from {folder}: {folder / 'config.json'} is not a valid minituring config "
            f"({err})"
        ) from None


def _flag(name: str, value) -> str:
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def parent_options(folder: str, given: dict[str, dict]) -> dict[str, dict]:
    """The options the child takes from the parent in ``folder``, by group (``model``,
    ``data``), for the flags not in ``given`` (those on the command line, by group). A given
    flag that contradicts the parent is a ``TrainingError`` naming it, the parent's value and
    the folder."""
    parent = Path(folder)
    config = parent_config(parent)
    where = f"--init-from {folder} ({parent / 'config.json'})"
    base: dict[str, dict] = {"model": {}, "data": {}}
    options = [("model", name) for name in FIXED]
    options += [(group, name) for group, names in FREE.items() for name in names]
    for group, name in options:
        field = CONFIG_FIELD.get(name, name)
        value = getattr(config, field, None)
        if value is None:
            continue
        wanted = given.get(group, {}).get(name, value)
        if group == "model" and name in FIXED and wanted != value:
            raise TrainingError(
                f"{_flag(name, wanted)} contradicts {where}: the parent's {field.replace('_', ' ')} "
                f"is {value}; the child keeps the parent's model: leave the flag out"
            )
        base[group][name] = value
    # The tokenizer is the parent's: none is given, none is trained.
    recorded = getattr(config, "training", None) or {}
    recorded = recorded.get("data", {}) if isinstance(recorded, dict) else {}
    tokenizer_file = parent / "tokenizer.json"
    if given.get("data", {}).get("tokenizer"):
        raise TrainingError(
            f"--tokenizer contradicts {where}: the child uses the parent's tokenizer, "
            f"{tokenizer_file}; leave the flag out"
        )
    sizes = [v for v in (recorded.get("vocab_size"), config.tokenizer_size) if v is not None]
    kinds = [recorded["tokenizer_kind"]] if recorded.get("tokenizer_kind") else []
    for name, accepted in (("vocab_size", sizes), ("tokenizer_kind", kinds)):
        if accepted:
            base["data"][name] = accepted[0]
        if name in given.get("data", {}) and given["data"][name] not in accepted:
            shown = " or ".join(map(str, accepted)) or "not recorded"
            raise TrainingError(
                f"{_flag(name, given['data'][name])} contradicts {where}: the parent's tokenizer "
                f"({tokenizer_file}) has {name.replace('_', ' ')} {shown}, and the child uses it; "
                "leave the flag out"
            )
    return base


def weights_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# What a child's model must share with its parent: the weights' shapes and the tokenizer they
# index (WEIGHT_FIELDS), and the activation the weights were trained with.
INHERITED_FIELDS = (*WEIGHT_FIELDS, "hidden_act")


def start_from_parent(model: torch.nn.Module, folder: Path, tokenizer) -> dict:
    """Load the parent's weights into ``model`` (plain, before any wrapping; every process
    does it), after checking that the parent's config, its tokenizer (``tokenizer``, the
    child's) and the model the options built agree. Returns the record config.json keeps:
    the parent's path and the SHA-256 of its weights file."""
    saved = parent_config(folder)
    parent_tokenizer = load_tokenizer(folder)
    try:
        check_compatible(parent_tokenizer, saved, where=str(folder))
    except TokenizerError as err:
        raise TrainingError(f"--init-from {folder}: {err}") from None
    added = _added_tasks(parent_tokenizer, tokenizer, folder)
    # New task tokens change the vocabulary's size, and nothing else.
    inherited = [f for f in INHERITED_FIELDS if not (added and f in VOCABULARY_FIELDS)]
    differences = model_differences(saved, model.config, inherited)
    if differences:
        raise TrainingError(
            f"--init-from {folder}: the model these options build is not the one in "
            f"{folder / 'config.json'}: {'; '.join(differences)}. Leave out the options that "
            "change it."
        )
    weights_file = folder / "model.safetensors"
    against = str(folder / "config.json")
    try:
        if added:
            weights = checked_weights(weights_file)
            weights[EMBEDDING] = extended(weights.get(EMBEDDING), model, saved, added, folder)
            weights = matching_weights(weights, model, weights_file, against=against)
        else:
            weights = checked_weights(weights_file, model, against=against)
    except RunFolderError as err:
        raise TrainingError(f"--init-from {folder}: {err}") from None
    model.load_state_dict(weights)
    return {"path": str(folder.resolve()), "weights_sha256": weights_sha256(weights_file)}


VOCABULARY_FIELDS = ("vocab_size", "tokenizer_size")
EMBEDDING = "embed.weight"  # the token embedding, tied to the output layer


def _added_tasks(parent, child, folder: Path) -> dict[str, int]:
    """The task tokens the child's tokenizer adds to the parent's, name -> id; a child
    tokenizer that is not the parent's (with task tokens appended) is refused."""
    n = len(parent)
    parent_vocab = parent.backend_tokenizer.get_vocab(with_added_tokens=True)
    child_vocab = child.backend_tokenizer.get_vocab(with_added_tokens=True)
    added = {name: i for name, i in task_ids(child).items() if name not in task_ids(parent)}
    same = {t: i for t, i in child_vocab.items() if i < n} == parent_vocab
    if not same or sorted(added.values()) != list(range(n, len(child))):
        raise TrainingError(
            f"--init-from {folder}: the child's tokenizer is not the parent's "
            f"({folder / 'tokenizer.json'}) with task tokens appended"
        )
    return added


def extended(embedding, model: torch.nn.Module, saved, added: dict[str, int], folder: Path):
    """The parent's token embedding grown to the child's rows: the parent's rows as they are,
    each new task token's row the mean of the parent's ordinary tokens' rows (not the special
    tokens, nor the rows that only round the vocabulary up), and any other new row (rounding
    up) as the child's model initialised it."""
    if embedding is None or tuple(embedding.shape) != (saved.vocab_size, saved.hidden_size):
        shape = None if embedding is None else tuple(embedding.shape)
        raise RunFolderError(
            f"{folder / 'model.safetensors'}: {EMBEDDING} has shape {shape}, config implies "
            f"{(saved.vocab_size, saved.hidden_size)}"
        )
    rows = model.state_dict()[EMBEDDING].detach().clone().to(embedding.dtype)
    rows[: saved.vocab_size] = embedding[: rows.shape[0]]
    ordinary = torch.ones(saved.tokenizer_size or saved.vocab_size, dtype=torch.bool)
    specials = [saved.pad_token_id, saved.unk_token_id, saved.bos_token_id, saved.eos_token_id,
                saved.mask_token_id, saved.sentence_mask_token_id,
                *(getattr(saved, "task_tokens", None) or {}).values()]  # fmt: skip
    ordinary[[i for i in specials if i is not None and i < len(ordinary)]] = False
    mean = embedding[: len(ordinary)][ordinary].float().mean(0).to(embedding.dtype)
    for i in added.values():
        rows[i] = mean
    return rows
