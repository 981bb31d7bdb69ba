"""Word error rate of transcripts against references: (substitutions + deletions + insertions) / reference
words, summed over all pairs (a corpus WER, as speech benchmarks report it), after a light normalisation
(lower case, punctuation other than apostrophes removed, whitespace collapsed) applied to both sides."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PUNCT = re.compile(r"[^\w\s']+")


def normalise(text: str) -> list[str]:
    """The words of ``text``, lower-cased, without punctuation (apostrophes kept)."""
    return _PUNCT.sub(" ", text.lower()).split()


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance between two word sequences (unit costs)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


@dataclass(frozen=True)
class WordErrorRate:
    """wer: errors / reference words; errors and words summed over ``pairs`` transcripts."""

    wer: float
    errors: int
    words: int
    pairs: int

    def describe(self) -> str:
        return f"WER {self.wer:.2%} ({self.errors} errors / {self.words} words, {self.pairs} clips)"


def word_error_rate(references: list[str], hypotheses: list[str]) -> WordErrorRate:
    """Corpus WER of ``hypotheses`` against ``references`` (same length, paired by position)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = words = 0
    for r, h in zip(references, hypotheses):
        rw = normalise(r)
        errors += edit_distance(rw, normalise(h))
        words += len(rw)
    return WordErrorRate(errors / max(words, 1), errors, words, len(references))


__all__ = ["WordErrorRate", "edit_distance", "normalise", "word_error_rate"]
