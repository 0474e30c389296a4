"""Verbatim memorisation, SUV protocol: slide a prefix window over each protected passage, continue it
with the model, and compare the continuation with the true next tokens.

Per window: token LCS (subsequence), longest common substring / prefix, ROUGE-L F1 on decoded text.
Per book and overall: mean / max LCS and ROUGE-L, windows with LCS >= k for every threshold k, and the
number "reproduced verbatim" (LCS >= ``main_threshold``; SUV's "sentences over threshold", 40 of 100).
:func:`score_windows` is the one scoring routine; SUV mining (:mod:`fisherdist.methods.suv.mine`) reuses it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from fisherdist.config import Section
from fisherdist.data.jsonl import encode, read_records, special_prefix
from fisherdist.eval.generation import Generate
from fisherdist.eval.lcs import lcs_length, longest_common_prefix, longest_common_substring, rouge_l
from fisherdist.eval.sharding import map_sharded


class MemorizationSettings(Section):
    """Window protocol; defaults are SUV's real-scale values (configs/eval/*_tiny.yaml shrink them)."""

    prefix_len: int = Field(20, gt=0, description="prompt window in tokens")
    stride: int = Field(5, gt=0, description="tokens between window starts")
    continuation_len: int = Field(100, gt=0, description="generated / reference tokens per window")
    thresholds: list[int] = Field(default_factory=lambda: list(range(20, 100, 10)), description="LCS >= k counts")
    main_threshold: int = Field(40, gt=0, description="LCS at which a window counts as reproduced verbatim")
    max_windows: int | None = Field(None, gt=0, description="seeded sample of windows (SUV fast eval: 128)")
    seed: int = 0
    batch_size: int = Field(16, gt=0, description="prompts per generation batch")
    book_field: str = "book"
    text_field: str = "text"

    @field_validator("thresholds", "main_threshold")
    @classmethod
    def _within_continuation(cls, v: Any, info: ValidationInfo) -> Any:
        limit = info.data.get("continuation_len")
        for k in v if isinstance(v, list) else [v]:
            if limit is not None and not 0 < k <= limit:
                raise ValueError(f"LCS threshold {k} must lie in 1..continuation_len={limit}")
        return v


@dataclass(frozen=True)
class Window:
    """``prefix`` = tokens [start, start+prefix_len) of passage number ``passage`` (its record index),
    ``target`` = the true next tokens."""

    book: str
    passage: int
    start: int
    prefix: list[int]
    target: list[int]


@dataclass
class WindowScore:
    book: str
    passage: int
    start: int
    lcs: int
    substring: int
    prefix_match: int
    rougeL: float
    generated: list[int] = field(repr=False)

    def row(self) -> dict[str, Any]:
        """JSON-friendly record without the generated ids."""
        d = asdict(self)
        del d["generated"]
        return d


def load_passages(path: str | Path, tokenizer: Any, book_field: str = "book", text_field: str = "text") -> list[tuple[str, list[int]]]:
    """``(book, token ids)`` per record of a JSON Lines file; a book may span several records (passages)."""
    return [(str(r[book_field]), encode(tokenizer, r[text_field])) for r in read_records(path, [book_field, text_field])]


def make_windows(passages: Sequence[tuple[str, Sequence[int]]], prefix_len: int, stride: int, continuation_len: int) -> list[Window]:
    """Every window whose prefix *and* full continuation fit inside its passage (windows never span two
    records, and every window is scored against the same number of reference tokens)."""
    windows = []
    for index, (book, ids) in enumerate(passages):
        for start in range(0, len(ids) - prefix_len - continuation_len + 1, stride):
            mid = start + prefix_len
            windows.append(Window(book, index, start, list(ids[start:mid]), list(ids[mid : mid + continuation_len])))
    return windows


def sample_windows(windows: list[Window], max_windows: int | None, seed: int) -> list[Window]:
    """At most ``max_windows`` windows, a seeded sample kept in passage order (SUV's fast evaluation)."""
    if max_windows is None or len(windows) <= max_windows:
        return windows
    keep = sorted(random.Random(seed).sample(range(len(windows)), max_windows))
    return [windows[i] for i in keep]


def score_windows(windows: Sequence[Window], generate: Generate, tokenizer: Any, seed: int = 0) -> list[WindowScore]:
    """Continue every window's prefix (``len(target)`` new tokens) and score it against the target.

    Window ``i`` is sampled with seed ``seed + i`` (irrelevant for greedy generators). Under
    ``torch.distributed`` the windows are split across ranks and the scores gathered, so every rank
    returns the full, identically ordered list.
    """
    lead = special_prefix(tokenizer)
    n = max((len(w.target) for w in windows), default=0)

    def local(items: list[tuple[Window, int]]) -> list[WindowScore]:
        outs = generate([lead + w.prefix for w, _ in items], n, [sd for _, sd in items])
        return [_score(w, list(out)[: len(w.target)], tokenizer) for (w, _), out in zip(items, outs)]

    return map_sharded([(w, seed + i) for i, w in enumerate(windows)], local)


def _score(w: Window, out: list[int], tokenizer: Any) -> WindowScore:
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return WindowScore(w.book, w.passage, w.start, lcs_length(out, w.target), longest_common_substring(out, w.target),
                       longest_common_prefix(out, w.target), rouge_l(decode(w.target), decode(out)), out)


def _stats(scores: Sequence[WindowScore], thresholds: Sequence[int], main: int) -> dict[str, Any]:
    n = len(scores)
    lcs = [s.lcs for s in scores]
    rl = [s.rougeL for s in scores]
    return {
        "windows": n,
        "mean_lcs": sum(lcs) / n if n else None,
        "max_lcs": max(lcs, default=None),
        "mean_rougeL": sum(rl) / n if n else None,
        "max_rougeL": max(rl, default=None),
        "mean_substring": sum(s.substring for s in scores) / n if n else None,
        "over_threshold": {str(k): sum(v >= k for v in lcs) for k in thresholds},
        "verbatim": sum(v >= main for v in lcs),
        "verbatim_rate": sum(v >= main for v in lcs) / n if n else None,
    }


def summarize(scores: Sequence[WindowScore], thresholds: Sequence[int], main_threshold: int, books: Sequence[str] = ()) -> dict[str, Any]:
    """``{"overall": stats, "books": {book: stats}}``; ``books`` lists books to report even with no window."""
    names = list(dict.fromkeys([*books, *(s.book for s in scores)]))
    per_book = {b: _stats([s for s in scores if s.book == b], thresholds, main_threshold) for b in names}
    return {"overall": _stats(scores, thresholds, main_threshold), "books": per_book}


def evaluate_memorization(passages: Sequence[tuple[str, Sequence[int]]], generate: Generate, tokenizer: Any,
                          settings: MemorizationSettings) -> tuple[dict[str, Any], list[WindowScore]]:
    """The SUV protocol end to end: ``(summary, per-window scores)``; summary also records the settings."""
    s = settings
    windows = sample_windows(make_windows(passages, s.prefix_len, s.stride, s.continuation_len), s.max_windows, s.seed)
    scores = score_windows(windows, generate, tokenizer, s.seed)
    summary = summarize(scores, s.thresholds, s.main_threshold, [b for b, _ in passages])
    return {"settings": s.model_dump(), **summary}, scores
