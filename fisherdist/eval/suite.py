"""One model's full evaluation: SUV memorisation on the protected books plus utility (perplexity on
held-out text, greedy task accuracy). All generation is greedy, so the numbers are deterministic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fisherdist.eval.generation import HFGenerator
from fisherdist.eval.memorization import MemorizationSettings, WindowScore, evaluate_memorization
from fisherdist.eval.utility import UtilitySettings, perplexity, task_accuracy


def evaluate_model(model: Any, tokenizer: Any, passages: Sequence[tuple[str, Sequence[int]]],
                   memorization: MemorizationSettings, utility: UtilitySettings | None = None,
                   heldout: Sequence[str] | None = None, task: Sequence[dict[str, str]] | None = None,
                   label: str = "") -> tuple[dict[str, Any], list[WindowScore]]:
    """``({"settings", "overall", "books", "utility"}, per-window scores)``; collective under torch.distributed."""
    u = utility or UtilitySettings()
    generate = HFGenerator.for_tokenizer(model, tokenizer, batch_size=memorization.batch_size,
                                         progress=f"memorisation {label}".strip())
    summary, scores = evaluate_memorization(passages, generate, tokenizer, memorization)
    util: dict[str, Any] = {}
    if heldout:
        util["perplexity"] = perplexity(model, tokenizer, list(heldout)[: u.heldout_samples], u.max_length, u.batch_size)
    if task:
        generate.progress = f"task accuracy {label}".strip()
        util["task"] = task_accuracy(generate, tokenizer, list(task)[: u.task_samples])
    return {**summary, "utility": util}, scores
