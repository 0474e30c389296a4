"""Question-answer records as tokenised pairs and per-rank micro-batches (answer tokens scored only)."""

from __future__ import annotations

import math
from typing import Any

import torch

from fisherdist.data.jsonl import read_records, special_prefix, split_encode
from fisherdist.recipes.losses import collate_prompted

Pair = tuple[list[int], list[int]]


def qa_pairs(tokenizer: Any, path: str) -> list[Pair]:
    """(special prefix + question tokens, answer tokens) per record."""
    lead = special_prefix(tokenizer)
    rows = read_records(path, ["question", "answer"])
    return [(lead + p, c) for p, c in (split_encode(tokenizer, r["question"], r["answer"]) for r in rows)]


def collate(pairs: list[Pair], valid: list[bool], pad_id: int, max_length: int,
            device: torch.device | str) -> dict[str, torch.Tensor]:
    """A right-padded batch with the question masked, plus ``valid`` (False: a top-up copy)."""
    b = collate_prompted([p for p, _ in pairs], [c for _, c in pairs], pad_id, max_length).to(device)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels,
            "valid": torch.tensor(valid, device=device)}


def rank_batches(pairs: list[Pair], batch_size: int, rank: int, world: int, pad_id: int, max_length: int,
                 device: torch.device | str) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches; every rank gets the same number (short ones topped up with invalid
    copies of record 0), so sharded forwards stay in step."""
    steps = math.ceil(len(pairs) / (batch_size * world))
    out = []
    for s in range(steps):
        idx = [(s * world + rank) * batch_size + i for i in range(batch_size)]
        valid = [i < len(pairs) for i in idx]
        out.append(collate([pairs[i] if ok else pairs[0] for i, ok in zip(idx, valid)], valid, pad_id, max_length, device))
    return out
