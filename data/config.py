"""The data options (:class:`DataConfig`, what the data flags of the command line fill) and
the checks that refuse options no data could satisfy, before any data is read."""

from __future__ import annotations

from dataclasses import dataclass, field

from data.objectives.masked_lm import MaskingConfig
from data.objectives.summarize import PAD_MULTIPLE
from model.tokenizer import SPECIAL_TOKENS, TokenizerError

TOKENIZER_KINDS = ("bpe", "wordpiece", "unigram")
# What --streaming can train: gap sentences and pairs stay on the prepared path.
STREAMED_OBJECTIVES = ("masked_lm",)


@dataclass
class DataConfig:
    train_text: list[str] = field(default_factory=list)
    """Text sources for the self-supervised objectives: .txt files or folders, jsonl/csv/parquet
    files, save_to_disk folders or hub dataset names. Empty: the embedded corpus."""
    train_pairs: list[str] = field(default_factory=list)
    """Document/summary pair sources (jsonl/csv/parquet, folders, datasets). NAME=SOURCE makes
    a source the pairs of a named text-to-text task (title=titles.jsonl), with its own token
    before the source, weight in --objectives, metrics and decoding defaults; unnamed sources
    are summarize's. Empty: the embedded corpus's docstring pairs when no text source is given
    either."""
    eval_text: list[str] = field(default_factory=list)
    """Held-out text sources. Empty: a stable-hash share of the training text."""
    eval_pairs: list[str] = field(default_factory=list)
    """Held-out pair sources (NAME=SOURCE for a named task). Empty: a stable-hash share of the
    training pairs."""
    text_column: str = "text"
    document_column: str = "document"
    summary_column: str = "summary"
    text_split: str = "line"
    """How plain text files split into documents: line, block (blank lines) or file."""
    hf_config: str | None = None
    """Configuration name of a hub dataset source."""
    hf_split: str = "train"
    """Split of a hub dataset or DatasetDict folder to read."""
    encoding: str = "utf-8"
    """Text encoding of plain-text, jsonl and csv sources."""
    eval_fraction: float = 0.02
    """Share of documents held out (by stable hash) when no eval source is given."""
    val_fraction: float = 0.05
    """Share of the training documents and pairs set aside (by a stable hash of near-duplicate
    groups, drawn apart from the held-out split) as the validation split, which picks the kept
    weights: at least min(100, a tenth of them), at most 500; 0: none (the last weights are
    kept). Not with --streaming."""
    tokenizer: str | None = None
    """A tokenizer.json (or folder holding one) to use instead of training one."""
    tokenizer_kind: str = "bpe"
    """Tokenizer to train: bpe (byte-level), wordpiece or unigram."""
    vocab_size: int = 8192
    source_len: int = 256
    """Summarization source length limit in tokens (longer sources are truncated)."""
    target_len: int = 48
    """Summarization target length limit in tokens (longer targets are truncated)."""
    gap_ratio: float = 0.3
    """Share of sentences hidden by gap-sentence generation."""
    mask_rate: float = 0.15
    source_mask_rate: float = 0.15
    """Share of each training source's words also masked and predicted in sequence-to-sequence
    steps (masked-LM signal in every summarization step, as in UniLM); 0: sources stay whole."""
    whole_word: bool = True
    span_masking: bool = False
    corpus_max_chars: int | None = None
    """Cap on the embedded corpus's size in characters (None: the corpus's default)."""
    pad_multiple: int = PAD_MULTIPLE
    """Pad sequence-to-sequence batches to a multiple of this many positions (1: to the longest
    example). Speed and memory only: CPU matrix kernels are prepared and kept per shape."""
    pack_pairs: str = "auto"
    """Pack several training pairs (and gap sentences) into each row of a sequence-to-sequence
    batch, each example attending to itself alone: on, off, or auto (on for a source whose
    batches packing shortens by at least 0.15 of their positions: short documents)."""
    streaming: bool = False
    """Read --train-text as a stream (a datasets IterableDataset, split across processes),
    tokenized and packed into masked-LM blocks on the fly, for corpora larger than disk; exact
    resume. masked_lm only. Held out: --eval-text, else the first 256 documents of the stream."""

    def masking(self) -> MaskingConfig:
        """The masked-LM masking these options ask for, checked."""
        masking = MaskingConfig(
            rate=self.mask_rate, whole_word=self.whole_word, span=self.span_masking
        )
        masking.validate()
        return masking


def check_tokenizer_options(kind: str, vocab_size: int) -> None:
    """Refuse a tokenizer kind or size that cannot be trained, before any data is read."""
    if kind not in TOKENIZER_KINDS:
        raise TokenizerError(
            f"unknown tokenizer kind {kind!r}; expected one of {', '.join(TOKENIZER_KINDS)}"
        )
    floor = len(SPECIAL_TOKENS) + (256 if kind == "bpe" else 0)
    if vocab_size <= floor:
        raise TokenizerError(
            f"vocabulary size {vocab_size} is too small: {kind} needs more than {floor} entries "
            f"({len(SPECIAL_TOKENS)} special tokens"
            + (" + 256 byte symbols)" if kind == "bpe" else ")")
        )


def check_objectives(weights: dict[str, float]) -> None:
    """Refuse an objective --streaming cannot train (``weights`` as --objectives gives them)."""
    streamed = STREAMED_OBJECTIVES
    unsupported = [name for name, w in weights.items() if w > 0 and name not in streamed]
    if unsupported:
        raise ValueError(
            f"--streaming trains {', '.join(streamed)} only, not {', '.join(unsupported)}; "
            "train sequence-to-sequence objectives without --streaming"
        )
