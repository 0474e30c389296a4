"""Sequence-overlap metrics between a generated and a true continuation.

Token-level LCS (longest common *subsequence*) is SUV's primary score; longest common substring and
prefix are the stricter variants from the same code base; ROUGE-L F1 (``rouge-score``, stemmed) is the
text-level score SUV and MUSE report. All token metrics take plain sequences of hashable items.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import lru_cache

import numpy as np


def _as_codes(a: Sequence[Hashable], b: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """Map both sequences to integer codes so the row updates below are numpy vector ops."""
    table: dict[Hashable, int] = {}
    ca = np.array([table.setdefault(x, len(table)) for x in a], dtype=np.int64)
    cb = np.array([table.setdefault(x, len(table)) for x in b], dtype=np.int64)
    return ca, cb


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) with one numpy row per item of ``a``.

    Row recurrence: ``new[j] = max(new[j-1], prev[j], prev[j-1] + [a_i == b_j])``; the dependence on
    ``new[j-1]`` unrolls to a running maximum, so ``new = cummax(max(prev[1:], prev[:-1] + match))``.
    """
    if not a or not b:
        return 0
    ca, cb = _as_codes(a, b)
    prev = np.zeros(len(cb) + 1, dtype=np.int64)
    for x in ca:
        cand = np.maximum(prev[1:], prev[:-1] + (cb == x))
        prev = np.concatenate(([0], np.maximum.accumulate(cand)))
    return int(prev[-1])


def longest_common_substring(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest contiguous run shared by ``a`` and ``b`` (diagonal DP, one row at a time)."""
    if not a or not b:
        return 0
    ca, cb = _as_codes(a, b)
    prev = np.zeros(len(cb) + 1, dtype=np.int64)
    best = 0
    for x in ca:
        prev = np.concatenate(([0], np.where(cb == x, prev[:-1] + 1, 0)))
        best = max(best, int(prev.max()))
    return best


def longest_common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Number of leading items on which ``a`` and ``b`` agree (the exact-extraction length)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference`` as SUV computes it (Porter stemming)."""
    return float(_scorer().score(reference, candidate)["rougeL"].fmeasure)
