"""SUV stage 2: preference pairs ``(prompt, chosen, rejected)`` from mined rows.

rejected = the verbatim continuation; chosen = a plausible continuation that is *not* verbatim. Chosen
text comes from a pluggable :class:`ChosenSource`: the target model sampled at a higher temperature
(default; SUV used a separate instruction-following LLM), another local HF model directory, or a user's
JSONL file of continuations keyed by prompt. A candidate is accepted when its token LCS with the verbatim
continuation is at most ``max_chosen_lcs``; otherwise up to ``max_tries`` candidates are drawn and the
least verbatim one is kept with ``flagged: true``. A row whose only candidates equal the verbatim text
(or are empty) is dropped, so chosen never equals rejected.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from fisherdist.config import Section, resolve_path
from fisherdist.data.jsonl import encode, read_records, special_prefix, split_decode, write_jsonl
from fisherdist.distributed.collectives import is_main
from fisherdist.errors import FisherdistError
from fisherdist.eval.generation import Generate, HFGenerator
from fisherdist.eval.lcs import lcs_length
from fisherdist.eval.sharding import map_sharded


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


class ChosenSource(Protocol):
    """Proposes one candidate chosen text per row for try number ``attempt`` (``None``: nothing more).

    Must return the same proposals on every rank (collective-safe); ``rows`` carry ``prompt``/``verbatim``.
    """

    def propose(self, rows: Sequence[dict[str, Any]], attempt: int) -> list[str | None]: ...


class SamplingSource:
    """Samples a continuation of the prompt from a causal LM (the target model or another one).

    Row seeds depend on the row's ``index`` and the attempt only, so the samples do not change with the
    batch size or the number of ranks.
    """

    def __init__(self, generate: Generate, tokenizer: Any, max_new_tokens: int, seed: int = 0) -> None:
        self.generate, self.tokenizer = generate, tokenizer
        self.max_new_tokens, self.seed = max_new_tokens, seed

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, settings: PrefsSettings) -> SamplingSource:
        gen = HFGenerator.for_tokenizer(model, tokenizer, temperature=settings.temperature,
                                        batch_size=settings.batch_size, progress="sampling chosen")
        return cls(gen, tokenizer, settings.max_new_tokens, settings.seed)

    @classmethod
    def from_dir(cls, path: str | Path, settings: PrefsSettings, device: Any = "cpu") -> SamplingSource:
        """Load a second local HF model directory (its own tokenizer decodes its samples)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = resolve_path(path)
        if not (p / "config.json").is_file():
            raise FisherdistError(f"prefs.model_path: no Hugging Face model directory at {p} (expected {p}/config.json)")
        model = AutoModelForCausalLM.from_pretrained(p).to(device)
        return cls.from_model(model, AutoTokenizer.from_pretrained(p), settings)

    def propose(self, rows: Sequence[dict[str, Any]], attempt: int) -> list[str | None]:
        lead = special_prefix(self.tokenizer)
        items = [(encode(self.tokenizer, r["prompt"]), self.seed + 1_000_003 * attempt + int(r["index"])) for r in rows]

        def local(part: list[tuple[list[int], int]]) -> list[str | None]:
            outs = self.generate([lead + p for p, _ in part], self.max_new_tokens, [sd for _, sd in part])
            return [split_decode(self.tokenizer, p, o)[1] for (p, _), o in zip(part, outs)]

        return map_sharded(items, local)


class JsonlSource:
    """Continuations written by the user: records ``{prompt, <field>}``; several records for the same
    prompt are successive candidates (try ``k`` uses the k-th)."""

    def __init__(self, path: str | Path, field: str = "continuation") -> None:
        self.by_prompt: dict[str, list[str]] = defaultdict(list)
        for rec in read_records(resolve_path(path), ["prompt", field]):
            self.by_prompt[rec["prompt"]].append(rec[field])

    def propose(self, rows: Sequence[dict[str, Any]], attempt: int) -> list[str | None]:
        cands = [self.by_prompt.get(r["prompt"], []) for r in rows]
        return [c[attempt] if attempt < len(c) else None for c in cands]


def make_source(settings: PrefsSettings, model: Any, tokenizer: Any) -> ChosenSource:
    """The source named by ``settings.source`` (``model``/``tokenizer``: the target model, for ``self``)."""
    if settings.source == "self":
        return SamplingSource.from_model(model, tokenizer, settings)
    if settings.source == "model":
        return SamplingSource.from_dir(settings.model_path, settings, next(model.parameters()).device)
    return JsonlSource(settings.jsonl_path, settings.jsonl_field)


def build_preferences(mined: Sequence[dict[str, Any]], source: ChosenSource, tokenizer: Any,
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
