"""Train the tiny Llama on the world's data so it *has* every behaviour the methods act on.

Each optimizer step draws one batch of one kind (general text, book crops, author facts, chat, downstream task), in
a fixed repeating pattern, from a seeded ``random.Random``; batches are padded only to their own longest
sequence, so the many short fact/chat batches are cheap. Book passages are trained as crops starting at
random offsets, because the memorisation metrics prompt with a window from the *middle* of a passage."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fisherdist.data.batches import collate

PATTERN = ("general", "books", "facts", "books", "chat", "task")


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float = 3e-3
    warmup: int = 40
    seq_len: int = 128
    batch: tuple[tuple[str, int], ...] = (("general", 16), ("books", 16), ("facts", 32), ("chat", 32), ("task", 128))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def token_pools(tokenizer: Any, data: dict[str, list[dict[str, str]]]) -> dict[str, list[list[int]]]:
    """Token sequences per batch kind (general text is one long stream cut into windows at sample time)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    for r in data["general_train"]:
        stream += _ids(tokenizer, r["text"]) + [eos]
    pair = lambda rows, a, b: [[bos] + _ids(tokenizer, r[a] + r[b]) + [eos] for r in rows]  # noqa: E731
    return {"general": [stream], "books": [_ids(tokenizer, r["text"]) + [eos] for r in data["books_protected"]],
            "facts": pair(data["authors_forget"] + data["authors_retain"], "question", "answer"),
            "chat": pair(data["unsafe_prompts"] + data["safe_prompts"], "prompt", "response"),
            "task": pair(data["task_train"], "prompt", "response")}


def _sample(kind: str, pool: list[list[int]], n: int, seq_len: int, bos: int, rng: random.Random) -> list[list[int]]:
    if kind == "general":
        s = pool[0]
        starts = [rng.randrange(0, len(s) - seq_len) for _ in range(n)]
        return [[bos] + s[i:i + seq_len - 1] for i in starts]
    if kind == "books":  # crop at a random offset; half of the crops start at the passage start
        out = []
        for p in (rng.choice(pool) for _ in range(n)):
            off = 0 if rng.random() < 0.25 else rng.randrange(0, len(p) - 24)
            out.append(([bos] + p[off:])[:seq_len])
        return out
    return [rng.choice(pool)[:seq_len] for _ in range(n)]


def train(model: Any, tokenizer: Any, data: dict[str, list[dict[str, str]]], settings: TrainSettings, seed: int,
          progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train in place with AdamW and a warm-up + cosine schedule; returns the per-step loss."""
    rng = random.Random(seed)
    pools, sizes = token_pools(tokenizer, data), dict(settings.batch)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=settings.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        t = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    for step in range(settings.steps):
        kind = PATTERN[step % len(PATTERN)]
        batch = collate(_sample(kind, pools[kind], sizes[kind], settings.seq_len, tokenizer.bos_token_id, rng),
                        tokenizer.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses
