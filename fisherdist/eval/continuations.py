"""Candidate continuations of prompts, one per row and try: sampled from a causal LM (the target model or
another local one), or read from a user's JSONL file keyed by prompt. Used to build preference pairs
(SUV's chosen texts) and any other "write something else here" data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fisherdist.config import resolve_path
from fisherdist.data.jsonl import encode, read_records, special_prefix, split_decode
from fisherdist.errors import FisherdistError
from fisherdist.eval.generation import Generate, HFGenerator
from fisherdist.eval.sharding import map_sharded


class SamplingSettings(Protocol):
    """What :meth:`SamplingSource.from_model` reads (e.g. SUV's ``prefs:`` section)."""

    temperature: float
    batch_size: int
    max_new_tokens: int
    seed: int


class ContinuationSource(Protocol):
    """Proposes one candidate continuation per row for try number ``attempt`` (``None``: nothing more).

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
    def from_model(cls, model: Any, tokenizer: Any, settings: SamplingSettings) -> SamplingSource:
        gen = HFGenerator.for_tokenizer(model, tokenizer, temperature=settings.temperature,
                                        batch_size=settings.batch_size, progress="sampling continuations")
        return cls(gen, tokenizer, settings.max_new_tokens, settings.seed)

    @classmethod
    def from_dir(cls, path: str | Path, settings: SamplingSettings, device: Any = "cpu") -> SamplingSource:
        """Load a second local HF model directory (its own tokenizer decodes its samples)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = resolve_path(path)
        if not (p / "config.json").is_file():
            raise FisherdistError(f"model_path: no Hugging Face model directory at {p} (expected {p}/config.json)")
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
