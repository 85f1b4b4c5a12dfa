"""How documents are split: the held-out share a run is scored on and the validation share that
picks its kept weights, each drawn by a stable hash of the document's near-duplicate group, the
same on every machine and run."""

from __future__ import annotations

import hashlib
import re


def is_held_out(key: str, fraction: float, salt: bytes = b"minituring/held-out") -> bool:
    """Whether ``key`` belongs to the held-out ``fraction``: a stable hash of the key, the same
    on every machine and run, and independent of any position in a list. Another ``salt``
    draws another, unrelated split."""
    if fraction <= 0:
        return False
    # Salted so the held-out set is unrelated to the sha256 order used to pick a capped subset.
    digest = hashlib.sha256(salt + b"\0" + key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


# Near-duplicates (packages sharing a description, docstrings copied between functions) agree
# on their first characters once case, punctuation and spacing are set aside.
_NOT_WORD = re.compile(r"[\W_]+")
GROUP_CHARS = 96


def group_key(text: str) -> str:
    """The key near-identical documents share: lowercased, every run of punctuation and
    whitespace made one space, the first :data:`GROUP_CHARS` characters."""
    return _NOT_WORD.sub(" ", text.lower()).strip()[:GROUP_CHARS].rstrip()


def held_out_document(text: str, fraction: float) -> bool:
    """:func:`is_held_out` of the document's :func:`group_key`: near-duplicates land on the
    same side of the split."""
    return is_held_out(group_key(text), fraction)


# The validation split: enough documents to tell a change of a point of ROUGE-L (at least
# min(VALIDATION_FLOOR, a tenth)), few enough not to starve training or slow its evaluations.
VALIDATION_FLOOR = 100
VALIDATION_CAP = 500
VALIDATION_SALT = b"minituring/validation"


def validation_share(count: int, fraction: float) -> float:
    """The share of ``count`` training documents set aside for validation: ``fraction`` of them,
    at least min(:data:`VALIDATION_FLOOR`, a tenth), at most :data:`VALIDATION_CAP`; 0 when
    ``fraction`` is 0."""
    if fraction <= 0 or count <= 0:
        return 0.0
    target = min(max(fraction * count, min(VALIDATION_FLOOR, count / 10)), VALIDATION_CAP)
    return target / count


def validation_document(text: str, share: float) -> bool:
    """Whether a training document is set aside for validation: :func:`is_held_out` of its
    :func:`group_key` with a salt of its own, so near-duplicates stay on one side and the draw
    is unrelated to the held-out split's."""
    return is_held_out(group_key(text), share, salt=VALIDATION_SALT)
