"""TOFU-style additions to the tiny world: per author question a paraphrased answer and several perturbed
(wrong but plausible) answers, and a retain-only reference model for the forget-quality KS test.

Both come from their own random streams, drawn after the tokenizer and the base model exist, so adding
them changes neither (the shipped base model stays bitwise identical). A paraphrase rewords the correct
value in a template; the perturbed answers put wrong values of the same kind in the same template, so the
truth ratio P(perturbed) / P(paraphrased) compares facts, not phrasings (TOFU's construction).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fisherdist.world.data import _ABSTRACT, _GENRES, _NOUNS, _name

PERTURBED = 5  # TOFU's count for the forget / retain splits
RETAIN_MODEL = "retain_model"

_KINDS = {"Where was": "city", "What genre": "genre", "What is the most famous book": "title",
          "In which year": "year"}
_TEMPLATES = {
    "city": [" The town of {v}.", " {v}, a small town.", " In {v}."],
    "genre": [" Mostly {v}.", " The genre was {v}.", " {v}, above all."],
    "title": [" The best known is {v}.", " {v}, the famous one.", " Surely {v}."],
    "year": [" The year {v}.", " In {v}.", " It was {v}."],
}
_WRONG: dict[str, Callable[[random.Random], str]] = {
    "city": lambda rng: _name(rng, 2) + rng.choice(["ford", "holm", "mere", "wick"]),
    "genre": lambda rng: rng.choice(_GENRES),
    "title": lambda rng: f"The {rng.choice(_NOUNS)} of {rng.choice(_ABSTRACT)}",
    "year": lambda rng: str(rng.randrange(1820, 1990)),
}


def fact_kind(question: str) -> str:
    """Which of the world's four facts a question asks for (from its wording)."""
    body = question.split("Question: ", 1)[-1]
    for head, kind in _KINDS.items():
        if body.startswith(head):
            return kind
    raise ValueError(f"not an author question of the tiny world: {question!r}")


def _wrong_values(kind: str, truth: str, n: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = _WRONG[kind](rng)
        if v != truth and v not in out:
            out.append(v)
    return out


def with_tofu_answers(row: dict[str, str], rng: random.Random) -> dict[str, Any]:
    """``row`` plus ``paraphrased_answer`` and a list of ``perturbed_answer`` (TOFU's field names)."""
    kind, truth = fact_kind(row["question"]), row["answer"].strip().rstrip(".")
    template = rng.choice(_TEMPLATES[kind])
    wrong = _wrong_values(kind, truth, PERTURBED, rng)
    return {**row, "paraphrased_answer": template.format(v=truth),
            "perturbed_answer": [template.format(v=w) for w in wrong]}


def add_tofu_answers(data: dict[str, list[dict[str, Any]]], seed: int) -> None:
    """Give every author row its paraphrased and perturbed answers, from a stream of their own."""
    rng = random.Random(f"tofu-answers:{seed}")
    for split in ("authors_forget", "authors_retain"):
        data[split] = [with_tofu_answers(r, rng) for r in data[split]]


def build_retain_model(out: Path, make_model: Callable[[], Any], tokenizer: Any, data: dict[str, Any],
                       train_one: Callable[[Any, dict[str, Any]], list[float]]) -> dict[str, Any]:
    """Train the same model on the same data without the forget authors into ``out/retain_model``
    (TOFU's retain model: the forget-quality reference)."""
    from fisherdist.world.measure import completion_accuracy

    model = make_model()
    losses = train_one(model, {**data, "authors_forget": []})
    model.save_pretrained(out / RETAIN_MODEL, safe_serialization=True)
    tokenizer.save_pretrained(out / RETAIN_MODEL)
    qa = ("question", "answer")
    return {"steps": len(losses), "final_loss": losses[-1],
            "forget_accuracy": completion_accuracy(model, tokenizer, data["authors_forget"], *qa),
            "retain_accuracy": completion_accuracy(model, tokenizer, data["authors_retain"], *qa)}
