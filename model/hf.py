"""A run folder as a Hugging Face model folder.

After ``import model`` the Auto classes know our config and model::

    AutoConfig.from_pretrained(run)              -> MiniTuringConfig
    AutoTokenizer.from_pretrained(run)           -> the run's fast tokenizer
    AutoModel.from_pretrained(run)               -> MiniTuringModel, with the run's weights
    AutoModelForMaskedLM.from_pretrained(run)    -> MiniTuringForMaskedLM (what pipeline("fill-mask") uses)

Without this package installed, ``trust_remote_code=True`` loads the same classes from copies
of ``model/config.py`` and ``model/transformer.py`` (and of the modules they import:
``REMOTE_CODE_FILES``) that ``save_remote_code`` writes into the run folder (the trainer calls
it when it creates the folder), named by the folder's ``config.json`` ``auto_map``.
``save_pretrained`` of our classes copies the same files, so a re-saved folder stays loadable
either way.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from model import cache as cache_module
from model import config as config_module
from model import constants as constants_module
from model import copy_attention as copy_attention_module
from model import losses as losses_module
from model import ops as ops_module
from model import transformer as transformer_module
from model.config import MODEL_TYPE, MiniTuringConfig
from model.files import atomic_path, atomic_write_text
from model.transformer import MiniTuringForMaskedLM, MiniTuringModel

# Module files copied verbatim into a run folder; their names are the modules auto_map names.
REMOTE_CODE_FILES = tuple(
    Path(m.__file__)
    for m in (
        config_module,
        constants_module,
        cache_module,
        losses_module,
        ops_module,
        copy_attention_module,
        transformer_module,
    )
)
AUTO_MAP = {
    "AutoConfig": f"config.{MiniTuringConfig.__name__}",
    "AutoModel": f"transformer.{MiniTuringModel.__name__}",
    "AutoModelForMaskedLM": f"transformer.{MiniTuringForMaskedLM.__name__}",
}
OUR_PACKAGES = ("model", "data", "train")


def register() -> None:
    """Make the Auto classes resolve ``model_type: minituring`` to our classes (idempotent).

    ``register_for_auto_class`` makes ``save_pretrained`` copy the code files and write
    ``auto_map`` too, as Hugging Face does for any custom model.
    """
    AutoConfig.register(MODEL_TYPE, MiniTuringConfig, exist_ok=True)
    AutoModel.register(MiniTuringConfig, MiniTuringModel, exist_ok=True)
    AutoModelForMaskedLM.register(MiniTuringConfig, MiniTuringForMaskedLM, exist_ok=True)
    MiniTuringConfig.register_for_auto_class("AutoConfig")
    MiniTuringModel.register_for_auto_class("AutoModel")
    MiniTuringForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")


def _check_self_contained(path: Path) -> None:
    """The copies must import nothing of ours by absolute name: remote code cannot see it."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        bad = [n for n in names if n.split(".")[0] in OUR_PACKAGES]
        if bad:
            raise RuntimeError(
                f"{path} imports {', '.join(bad)} by absolute name, so its copy in a run folder "
                "cannot load with trust_remote_code; import sibling modules relatively"
            )


def save_remote_code(folder: str | os.PathLike) -> list[Path]:
    """Copy the config and model code into ``folder`` and add ``auto_map`` to its config.json,
    so ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` works without this
    package. Returns the files written."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: save the config before the code")
    written = []
    for source in REMOTE_CODE_FILES:
        _check_self_contained(source)
        target = folder / source.name
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        written.append(target)
    data = json.loads(config_file.read_text())
    data["auto_map"] = {**data.get("auto_map", {}), **AUTO_MAP}
    atomic_write_text(config_file, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return written


register()
