"""Whether training text contains passages of the evaluation text, whatever the files and whitespace.

A byte hash only catches the same file twice. A training file that is the evaluation text plus
something else, the evaluation text with another line break or other spaces, or parts of it
pasted into a corpus all train on what is then measured. So both texts are cut into words and
punctuation marks (``\\w+`` runs and single other characters, case-folded), which no change of
whitespace or file boundary alters, and every run of :data:`NGRAM` consecutive ones of the
evaluation text is hashed (a 64-bit polynomial hash, vectorised with numpy); the training text
is streamed in chunks through the same hash, and every hit is confirmed on the words themselves.

:data:`NGRAM` is 24: about 30 tokens of a BPE vocabulary, a quarter of the shortest evaluation
window rcpu uses, so any training text holding one whole evaluation window is caught many
times over; and long enough that distinct texts do not share such runs by chance (the built-in
Wikipedia sample's training and held-out parts and the Brown Corpus's share none; see
docs/recovery.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = ["NGRAM", "Overlap", "find_overlap", "words"]

#: words and punctuation marks per compared run
NGRAM = 24
_WORD = re.compile(r"\w+|[^\w\s]")
_BASE = np.uint64(0x100000001B3)  # an odd 64-bit multiplier (FNV's prime)
_CHUNK = 1 << 23  # characters of training text tokenised at once


def words(text: str) -> list[str]:
    """``text`` as case-folded words and punctuation marks (whitespace only separates)."""
    return _WORD.findall(text.casefold())


def _hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """The polynomial hash of every run of ``n`` consecutive ids (``len(ids) - n + 1`` values)."""
    count = ids.shape[0] - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _BASE + ids[k:k + count]
    return h


@dataclass
class Overlap:
    runs: int  #: training positions that start a run of NGRAM words found in the evaluation text
    eval_runs: int  #: runs of the evaluation text found in the training text
    eval_total: int  #: runs of the evaluation text
    example: str  #: one shared run, as words

    def __bool__(self) -> bool:
        return self.runs > 0


def _chunks(text: str):
    """``text`` in pieces of about :data:`_CHUNK` characters, cut at whitespace."""
    start = 0
    while start < len(text):
        end = min(len(text), start + _CHUNK)
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def find_overlap(train_text: str, eval_text: str, n: int = NGRAM) -> Overlap:
    """How much of ``eval_text`` (in runs of ``n`` words) occurs in ``train_text``."""
    vocab: dict[str, int] = {}
    eval_words = words(eval_text)
    eval_ids = np.array([vocab.setdefault(w, len(vocab) + 1) for w in eval_words], dtype=np.uint64)
    eval_h = _hashes(eval_ids, n)
    if eval_h.size == 0:
        return Overlap(0, 0, 0, "")
    order = np.argsort(eval_h, kind="stable")
    sorted_h = eval_h[order]
    found = np.zeros(eval_h.size, dtype=bool)
    runs, example, carry = 0, "", np.zeros(0, dtype=np.uint64)
    for piece in _chunks(train_text):
        # words the evaluation text does not have get id 0, which no evaluation run contains
        ids = np.concatenate([carry, np.array([vocab.get(w, 0) for w in words(piece)], dtype=np.uint64)])
        h = _hashes(ids, n)
        hit = np.flatnonzero(np.isin(h, sorted_h))
        for i in hit:  # confirm on the words (a hash collision is not a leak)
            lo = np.searchsorted(sorted_h, h[i], side="left")
            hi = np.searchsorted(sorted_h, h[i], side="right")
            same = [order[j] for j in range(lo, hi) if np.array_equal(eval_ids[order[j]:order[j] + n], ids[i:i + n])]
            if same:
                runs += 1
                found[same] = True
                if not example:
                    example = " ".join(eval_words[same[0]:same[0] + n])
        carry = ids[-(n - 1):] if n > 1 and ids.size >= n - 1 else ids
    return Overlap(runs, int(found.sum()), int(eval_h.size), example)
