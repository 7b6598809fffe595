"""Scores of a written answer against reference answers: exact match and token F1 after
SQuAD's normalisation, each the best over the references.

SQuAD v1.1's official scoring lower-cases, drops punctuation and the articles a, an and
the, and collapses whitespace before comparing; F1 counts the tokens (whitespace-split)
the two answers share, with repeats. Scores here are fractions in [0, 1], as edgezo's
accuracies are; papers print them times 100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference."""
    guess = normalize(prediction)
    return float(any(guess == normalize(r) for r in references))


def _f1(prediction: str, reference: str) -> float:
    guess, truth = normalize(prediction).split(), normalize(reference).split()
    if not guess or not truth:  # an empty answer is right only against an empty one
        return float(guess == truth)
    shared = sum((Counter(guess) & Counter(truth)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(guess), shared / len(truth)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, references: Sequence[str]) -> float:
    """Token F1 of the prediction against its best reference."""
    return max((_f1(prediction, r) for r in references), default=0.0)


def first_line(text: str) -> str:
    """The answer a model wrote up to its first line break, stripped: where a task's
    answer ends when the model goes on writing."""
    return text.split("\n", 1)[0].strip()
