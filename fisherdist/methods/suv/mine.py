"""SUV stage 1: find the windows of each protected book that the model reproduces (infringements).

Slide a ``prefix_len`` window with ``stride`` over every passage, continue it (near-)greedily, score the
continuation against the true one with :func:`fisherdist.eval.memorization.score_windows` (the same
routine as the evaluation), and keep the hits: LCS >= ``min_lcs`` or ROUGE-L >= ``min_rougeL``.

Differences from the reference code, on purpose: every window is scored in large batches first and the
de-duplication (after a hit, skip ``skip`` tokens — SUV jumps one window) is applied afterwards, which
gives the same rows as SUV's sequential scan without serialising generation; table-of-contents-like
prompts are dropped *before* de-duplication so a TOC hit never hides a real neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from fisherdist.config import Section
from fisherdist.data.jsonl import split_decode, write_jsonl
from fisherdist.distributed.collectives import is_main
from fisherdist.eval.generation import Generate, HFGenerator
from fisherdist.eval.memorization import Window, WindowScore, load_passages, make_windows, score_windows

TOC_KEYWORDS = ["chapter", "table of contents", "acknowledgements"]


class MineSettings(Section):
    """Defaults are SUV's (Llama-3.1-8B); configs/suv/tiny.yaml shrinks them for the tiny world."""

    prefix_len: int = Field(20, gt=0)
    stride: int = Field(5, gt=0)
    continuation_len: int = Field(100, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 = greedy (SUV: 0.01, greedy up to ties)")
    seed: int = 0
    batch_size: int = Field(16, gt=0, description="prompts per generation batch")
    min_lcs: int = Field(30, gt=0, description="hit if token LCS >= min_lcs ...")
    min_rougeL: float = Field(0.9, gt=0, le=1, description="... or ROUGE-L F1 >= min_rougeL")
    skip: int | None = Field(None, gt=0, description="tokens skipped after a hit (default: prefix_len)")
    max_rows_per_book: int | None = Field(1000, gt=0, description="keep the top rows by ROUGE-L")
    toc_keywords: list[str] = Field(default_factory=lambda: list(TOC_KEYWORDS))
    book_field: str = "book"
    text_field: str = "text"

    @model_validator(mode="after")
    def _reachable(self) -> MineSettings:
        if self.min_lcs > self.continuation_len:  # an LCS never exceeds the continuation: no window could be a hit
            raise ValueError(f"mine.min_lcs={self.min_lcs} can never be met: an LCS is at most "
                             f"mine.continuation_len={self.continuation_len}")
        return self


def is_toc_like(prompt: str, keywords: Sequence[str] = TOC_KEYWORDS) -> bool:
    """SUV's keyword rule for table-of-contents / front-matter prompts (case-insensitive)."""
    low = prompt.lower()
    return any(k.lower() in low for k in keywords)


def dedup_hits(hits: Sequence[WindowScore], skip: int) -> list[WindowScore]:
    """Per passage in token order, drop a hit that starts fewer than ``skip`` tokens after the last kept one."""
    kept: list[WindowScore] = []
    last: dict[int, int] = {}
    for h in sorted(hits, key=lambda h: (h.passage, h.start)):
        if h.passage in last and h.start < last[h.passage] + skip:
            continue
        last[h.passage] = h.start
        kept.append(h)
    return kept


def _cap(rows: list[dict[str, Any]], per_book: int | None) -> list[dict[str, Any]]:
    """At most ``per_book`` rows per book, the highest ROUGE-L (then LCS) first, returned in text order."""
    if per_book is None:
        return rows
    chosen: list[dict[str, Any]] = []
    for book in dict.fromkeys(r["book"] for r in rows):
        mine = [r for r in rows if r["book"] == book]
        chosen += sorted(mine, key=lambda r: (-r["rougeL"], -r["lcs"], r["passage"], r["start"]))[:per_book]
    return sorted(chosen, key=lambda r: (r["passage"], r["start"]))


def mine(passages: Sequence[tuple[str, Sequence[int]]], generate: Generate, tokenizer: Any,
         settings: MineSettings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Mined rows ``{prompt, verbatim, lcs, rougeL, book, passage, start}`` and a summary of counts.

    ``prompt + verbatim`` is the decoded window (prefix + true continuation). All ranks return the same.
    """
    s = settings
    windows = make_windows(passages, s.prefix_len, s.stride, s.continuation_len)
    by_key: dict[tuple[int, int], Window] = {(w.passage, w.start): w for w in windows}
    scores = score_windows(windows, generate, tokenizer, s.seed)
    hits = [sc for sc in scores if sc.lcs >= s.min_lcs or sc.rougeL >= s.min_rougeL]
    texts = {(h.passage, h.start): split_decode(tokenizer, by_key[h.passage, h.start].prefix,
                                                by_key[h.passage, h.start].target) for h in hits}
    clean = [h for h in hits if not is_toc_like(texts[h.passage, h.start][0], s.toc_keywords)]
    kept = dedup_hits(clean, s.skip or s.prefix_len)
    rows = [{"prompt": texts[h.passage, h.start][0], "verbatim": texts[h.passage, h.start][1], "lcs": h.lcs,
             "rougeL": h.rougeL, "book": h.book, "passage": h.passage, "start": h.start} for h in kept]
    rows = _cap(rows, s.max_rows_per_book)
    summary = {"windows": len(windows), "hits": len(hits), "toc_dropped": len(hits) - len(clean),
               "after_dedup": len(kept), "rows": len(rows)}
    return rows, summary


def mine_file(model: Any, tokenizer: Any, books: str | Path, out: str | Path | None,
              settings: MineSettings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`mine` with an :class:`HFGenerator` over a books JSONL; rank 0 writes ``out`` (if given)."""
    s = settings
    passages = load_passages(books, tokenizer, s.book_field, s.text_field)
    generate = HFGenerator.for_tokenizer(model, tokenizer, temperature=s.temperature, batch_size=s.batch_size,
                                         progress="mining")
    rows, summary = mine(passages, generate, tokenizer, s)
    if out is not None and is_main():
        write_jsonl(out, rows)
    return rows, summary
