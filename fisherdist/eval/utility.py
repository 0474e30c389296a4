"""Utility after unlearning: held-out perplexity, greedy task accuracy and refusal rate, all deterministic.

Perplexity is exp of the *token-weighted* mean NLL (every predicted token counts once, so long texts
weigh more, as in a language-modelling benchmark). Task accuracy is exact match at token level: the
greedy continuation of the prompt must reproduce the reference response's tokens.
Both split their inputs across ranks under ``torch.distributed`` and return the same numbers everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from fisherdist.config import Section
from fisherdist.data.jsonl import special_prefix, split_encode
from fisherdist.eval.generation import Generate
from fisherdist.eval.sharding import map_sharded


class UtilitySettings(Section):
    max_length: int = Field(128, gt=1, description="tokens per held-out text (longer texts are truncated)")
    batch_size: int = Field(8, gt=0)
    heldout_samples: int | None = Field(None, gt=0, description="first N held-out texts (default: all)")
    task_samples: int | None = Field(None, gt=0, description="first N task records (default: all)")


@torch.no_grad()
def _nll_sums(model: Any, token_lists: list[list[int]], pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    """``(sum of token NLLs, predicted tokens)`` per text, in float64."""
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(token_lists), batch_size):
            chunk = token_lists[lo : lo + batch_size]
            width = max(len(t) for t in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, t in enumerate(chunk):
                ids[i, : len(t)] = torch.tensor(t)
                mask[i, : len(t)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]
            out += [(float(s), int(c)) for s, c in zip(nll.sum(1).tolist(), mask[:, 1:].sum(1).tolist())]
    finally:
        model.train(was_training)
    return out


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 128, batch_size: int = 8) -> dict[str, Any]:
    """``{"perplexity", "nll", "tokens", "texts"}`` over ``texts`` (special tokens added as in training)."""
    token_lists = [list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
    token_lists = [t for t in token_lists if len(t) >= 2]
    if not token_lists:
        raise ValueError("perplexity: no text with at least 2 tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = map_sharded(token_lists, lambda ts: _nll_sums(model, ts, pad, batch_size))
    total = sum(s for s, _ in sums)
    tokens = sum(c for _, c in sums)
    return {"perplexity": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens, "texts": len(token_lists)}


def task_accuracy(generate: Generate, tokenizer: Any, records: Sequence[dict[str, str]],
                  prompt_field: str = "prompt", response_field: str = "response") -> dict[str, Any]:
    """``{"accuracy", "correct", "total"}``: a record is correct when the greedy continuation of the
    prompt starts with exactly the response's tokens (anything generated after them is ignored)."""
    lead = special_prefix(tokenizer)
    pairs = [split_encode(tokenizer, r[prompt_field], r[response_field]) for r in records]
    n = max(len(c) for _, c in pairs)

    def local(ps: list[tuple[list[int], list[int]]]) -> list[bool]:
        outs = generate([lead + p for p, _ in ps], n)
        return [list(o[: len(c)]) == c for (_, c), o in zip(ps, outs)]

    hits = map_sharded(pairs, local)
    return {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "total": len(hits)}


def refusal_rate(generate: Generate, tokenizer: Any, prompts: Sequence[str], refusal: str,
                 new_tokens: int = 8, words: int = 3) -> dict[str, Any]:
    """``{"rate", "refused", "total"}``: a prompt counts as refused when its greedy reply begins like
    ``refusal`` (its first ``words`` words), so a paraphrased tail still counts."""
    lead = special_prefix(tokenizer)
    head = " ".join(refusal.split()[:words])
    rows = [lead + list(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]

    def local(ps: list[list[int]]) -> list[bool]:
        return [tokenizer.decode(o).strip().startswith(head) for o in generate(ps, new_tokens)]

    hits = map_sharded(rows, local)
    return {"rate": sum(hits) / len(hits), "refused": sum(hits), "total": len(hits)}
