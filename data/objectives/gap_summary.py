"""Self-supervised summarization on raw text: PEGASUS gap-sentence generation (GSG).

The sentences most central to a document, scored by ROUGE-1 F1 against the rest of it
("Ind-Orig" in the PEGASUS paper), are replaced in the source by ``[MASK_SENT]``; the model
generates them, in document order. A document with fewer than two sentences gives no example.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

from rouge_score import rouge_scorer, tokenizers

# A sentence ends at . ! or ? followed by whitespace and an upper-case letter, digit or quote,
# or at a blank line (paragraph breaks in docs and docstrings rarely end in punctuation).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9`])|\n\s*\n")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


@lru_cache(maxsize=1)
def _tokenizer() -> tokenizers.DefaultTokenizer:
    return tokenizers.DefaultTokenizer(use_stemmer=False)


def sentence_scores(sentences: list[str]) -> list[float]:
    """ROUGE-1 F1 of each sentence against the rest of the document."""
    tok = _tokenizer()
    counts = [Counter(tok.tokenize(s)) for s in sentences]
    total = sum(counts, Counter())
    # rouge_score's own n-gram scorer; the rest of the document is total minus the sentence.
    return [rouge_scorer._score_ngrams(total - c, c).fmeasure for c in counts]


def gap_sentences(
    text: str, *, ratio: float = 0.3, max_chars: int | None = None, mask_token: str = "[MASK_SENT]"
) -> tuple[str, str] | None:
    """Return (source with gaps, target sentences) or None when the text has < 2 sentences.

    ``max_chars`` keeps only the leading sentences that fit, so the gaps fall inside the part
    of the document the model will see after truncation.
    """
    sentences = split_sentences(text)
    if max_chars is not None:
        kept, size = [], 0
        for s in sentences:
            if kept and size + len(s) > max_chars:
                break
            kept.append(s)
            size += len(s) + 1
        sentences = kept
    if len(sentences) < 2:
        return None
    scores = sentence_scores(sentences)
    n_gaps = max(1, min(len(sentences) - 1, round(ratio * len(sentences))))
    ranked = sorted(range(len(sentences)), key=lambda i: (-scores[i], i))[:n_gaps]
    chosen = set(ranked)
    source = " ".join(mask_token if i in chosen else s for i, s in enumerate(sentences))
    target = " ".join(sentences[i] for i in sorted(chosen))
    return source, target
