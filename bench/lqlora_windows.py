"""Every-token held-out scoring shared by the LQ-LoRA protocol benches (lqlora_crossfit, lqlora_probe).

``bench/lqlora.py`` scores the first 128 tokens of each text (the recipe's eval); the paper's comparison
needs every token, so texts are cut into 128-token windows, each opened by BOS, and the NLL sums are kept
per text so that bootstrap intervals can resample texts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

Window = tuple[int, list[int]]  # (index of the text it comes from, token ids starting with BOS)


def windows(tokenizer: Any, texts: list[str], length: int = 128) -> list[Window]:
    """Consecutive windows of ``length - 1`` text tokens, each behind a BOS, covering every token."""
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.extend((i, [tokenizer.bos_token_id, *ids[s : s + length - 1]]) for s in range(0, len(ids), length - 1))
    return out


def first_windows(rows: list[Window]) -> list[Window]:
    """The first window of each text (the truncated protocol, for comparison)."""
    seen: set[int] = set()
    return [(i, ids) for i, ids in rows if not (i in seen or seen.add(i))]


def per_text_nll(model: Any, rows: list[Window], n_texts: int) -> torch.Tensor:
    """[texts, 2]: summed NLL and scored tokens per text (their ratio of sums is the perplexity's)."""
    n = max(len(ids) for _, ids in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, (_, x) in enumerate(rows):
        ids[k, : len(x)] = torch.tensor(x)
        mask[k, : len(x)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]
    out = torch.zeros(n_texts, 2, dtype=torch.float64)
    for k, (i, _) in enumerate(rows):
        out[i, 0] += float(nll[k].sum())
        out[i, 1] += float(mask[k, 1:].sum())
    return out


def perplexity(per_text: torch.Tensor) -> float:
    return float((per_text[:, 0].sum() / per_text[:, 1].sum()).exp())


@contextmanager
def substituted(model: Any, approx: dict[str, torch.Tensor]) -> Iterator[None]:
    """The model with ``approx`` in place of those weights; the originals are back on exit."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in approx}
    with torch.no_grad():
        for n, w in approx.items():
            params[n].copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)
