"""SUV stage 2: preference pairs ``(prompt, chosen, rejected)`` from mined rows.

rejected = the verbatim continuation; chosen = a plausible continuation that is *not* verbatim, from a
:class:`~fisherdist.eval.continuations.ContinuationSource`: the target model sampled at a higher
temperature (default; SUV used a separate instruction-following LLM), another local HF model directory,
or a user's JSONL file of continuations keyed by prompt. A candidate is accepted when its token LCS with the verbatim
continuation is at most ``max_chosen_lcs``; otherwise up to ``max_tries`` candidates are drawn and the
least verbatim one is kept with ``flagged: true``. A row whose only candidates equal the verbatim text
(or are empty) is dropped, so chosen never equals rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from fisherdist.config import Section
from fisherdist.data.jsonl import encode, read_records, write_jsonl
from fisherdist.distributed.collectives import is_main
from fisherdist.eval.continuations import ContinuationSource, JsonlSource, SamplingSource
from fisherdist.eval.lcs import lcs_length


class PrefsSettings(Section):
    source: Literal["self", "model", "jsonl"] = Field("self", description="where chosen continuations come from")
    model_path: str | None = Field(None, description="source=model: local HF model directory")
    jsonl_path: str | None = Field(None, description="source=jsonl: records {prompt, continuation}")
    jsonl_field: str = "continuation"
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the self/model sources")
    max_new_tokens: int = Field(100, gt=0)
    max_chosen_lcs: int = Field(30, ge=0, description="accept a candidate whose token LCS with rejected <= this")
    max_tries: int = Field(4, gt=0)
    seed: int = 0
    batch_size: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _source_input(self) -> PrefsSettings:
        if self.source == "model" and not self.model_path:
            raise ValueError("source=model needs model_path")
        if self.source == "jsonl" and not self.jsonl_path:
            raise ValueError("source=jsonl needs jsonl_path")
        return self


def make_source(settings: PrefsSettings, model: Any, tokenizer: Any) -> ContinuationSource:
    """The source named by ``settings.source`` (``model``/``tokenizer``: the target model, for ``self``)."""
    if settings.source == "self":
        return SamplingSource.from_model(model, tokenizer, settings)
    if settings.source == "model":
        return SamplingSource.from_dir(settings.model_path, settings, next(model.parameters()).device)
    return JsonlSource(settings.jsonl_path, settings.jsonl_field)


def build_preferences(mined: Sequence[dict[str, Any]], source: ContinuationSource, tokenizer: Any,
                      settings: PrefsSettings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Preference rows ``{prompt, chosen, rejected, book, chosen_lcs, flagged}`` and counts.

    ``chosen_lcs`` is the token LCS (target tokenizer) between chosen and rejected.
    """
    rows = [{**r, "index": i} for i, r in enumerate(mined)]
    truth = [encode(tokenizer, r["verbatim"]) for r in rows]
    best: list[tuple[int, str] | None] = [None] * len(rows)
    pending = list(range(len(rows)))
    for attempt in range(settings.max_tries):
        if not pending:
            break
        for i, cand in zip(pending, source.propose([rows[i] for i in pending], attempt)):
            if cand is None or not cand.strip() or cand == rows[i]["verbatim"]:
                continue
            score = lcs_length(encode(tokenizer, cand), truth[i])
            if best[i] is None or score < best[i][0]:
                best[i] = (score, cand)
        pending = [i for i in pending if best[i] is None or best[i][0] > settings.max_chosen_lcs]
    prefs = [{"prompt": r["prompt"], "chosen": b[1], "rejected": r["verbatim"], "book": r["book"],
              "chosen_lcs": b[0], "flagged": b[0] > settings.max_chosen_lcs}
             for r, b in zip(rows, best) if b is not None]
    flagged = sum(p["flagged"] for p in prefs)
    return prefs, {"mined": len(rows), "pairs": len(prefs), "flagged": flagged, "dropped": len(rows) - len(prefs)}


def prefs_file(mined_path: str | Path, out: str | Path | None, model: Any, tokenizer: Any,
               settings: PrefsSettings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`build_preferences` from a mined JSONL (stage 1's output); rank 0 writes ``out`` (if given)."""
    mined = read_records(mined_path, ["prompt", "verbatim", "book"])
    prefs, summary = build_preferences(mined, make_source(settings, model, tokenizer), tokenizer, settings)
    if out is not None and is_main():
        write_jsonl(out, prefs)
    return prefs, summary
