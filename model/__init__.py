"""minituring's model: one UniLM-style transformer for masked-word prediction and
summarization, and the inference API.

    import model
    lm = model.load("runs/default")
    lm.fill_mask("Return the [MASK] value of a number.")
    lm.summarize("a long document ...")
"""

from model import hf  # registers our classes with the transformers Auto classes
from model.api import LM, RunFolderError, load
from model.config import PRESETS, MiniTuringConfig
from model.generate import DecodingConfig, generate
from model.transformer import MiniTuringForMaskedLM, MiniTuringModel

__all__ = [
    "LM",
    "PRESETS",
    "DecodingConfig",
    "MiniTuringConfig",
    "MiniTuringForMaskedLM",
    "MiniTuringModel",
    "RunFolderError",
    "generate",
    "hf",
    "load",
]
