"""Run-level evaluation from config sections: memorisation of protected passages, held-out perplexity and
task accuracy of one model (any method that protects or unlearns passages reports these)."""

from __future__ import annotations

from typing import Any

from fisherdist.config import DataFile
from fisherdist.data.jsonl import read_records
from fisherdist.eval.memorization import MemorizationSettings
from fisherdist.eval.utility import UtilitySettings
from fisherdist.recipes.stages import RunContext


def model_metrics(r: RunContext[Any], model: Any, books: DataFile, m: MemorizationSettings, u: UtilitySettings,
                  heldout: DataFile | None = None, task: DataFile | None = None,
                  text_field: str = "text") -> dict[str, Any]:
    """``{"memorization": ..., "perplexity"?, "task"?}`` of ``model`` (collective: every rank calls it)."""
    from fisherdist.eval.memorization import load_passages
    from fisherdist.eval.suite import evaluate_model

    passages = load_passages(books, r.tokenizer, m.book_field, m.text_field)
    texts = [x[text_field] for x in read_records(heldout, [text_field])] if heldout else None
    records = read_records(task, ["prompt", "response"]) if task else None
    summary, _ = evaluate_model(model, r.tokenizer, passages, m, u, texts, records)
    return {"memorization": {k: v for k, v in summary.items() if k != "utility"}, **summary["utility"]}


def passage_rows(r: RunContext[Any], books: DataFile, m: MemorizationSettings) -> list[dict[str, Any]]:
    """The passages evaluated: ``{book, text, tokens}`` per record of the books file."""
    rows = []
    for rec in read_records(books, [m.book_field, m.text_field]):
        text = rec[m.text_field]
        rows.append({"book": rec[m.book_field], "text": text, "tokens": len(r.tokenizer(text)["input_ids"])})
    return rows
