"""Preference pairs on the shared trainer: token ids from a ``{prompt, chosen, rejected}`` file and the
DPO loss of one global step, scaled so the backend's gradient average is the global mean's gradient.

Each rank's loss is ``W * sum(valid pair losses) / N_s``, N_s the step's global number of real pairs: the
same update as one process holding the whole global batch, whatever the world size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fisherdist.data.jsonl import read_records, special_prefix, split_encode
from fisherdist.recipes.losses import collate_pairs, dpo_loss, reference_logprobs, sequence_logprobs
from fisherdist.recipes.trainer import StepBatch


@dataclass
class PairTokens:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def load_pairs(path: Path, tokenizer: Any, max_length: int) -> list[PairTokens]:
    """``prefs.jsonl`` -> token ids; the prompt carries the tokenizer's special prefix (BOS) as in mining."""
    lead = special_prefix(tokenizer)
    pairs = []
    for rec in read_records(path, ["prompt", "chosen", "rejected"]):
        p, c = split_encode(tokenizer, rec["prompt"], rec["chosen"])
        _, rej = split_encode(tokenizer, rec["prompt"], rec["rejected"])
        pairs.append(PairTokens((lead + p)[:max_length], c, rej))
    return pairs


def pairs_fingerprint(pairs: list[PairTokens]) -> str:
    """Identifies the training data in a checkpoint: a resume over other pairs is refused."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
    return h.hexdigest()[:16]


def dpo_step_loss(wrapped: Any, pairs: list[PairTokens], batch: StepBatch, pad_id: int, max_length: int,
                  beta: float) -> torch.Tensor:
    """This rank's share of the step's global mean DPO loss (reference: the adapter switched off); a rank
    with only padding still runs the forward and the collectives, with zero weight."""
    real = [i for i in batch.mine if i >= 0]
    items = [pairs[i] for i in (real or [0])]
    device = next(p for _, p in wrapped.named_trainable()).device
    pb = collate_pairs([p.prompt for p in items], [p.chosen for p in items], [p.rejected for p in items],
                       pad_id, max_length)
    pb.input_ids, pb.attention_mask, pb.labels = (t.to(device) for t in (pb.input_ids, pb.attention_mask, pb.labels))
    ref = reference_logprobs(wrapped.unwrapped, pb)
    logits = wrapped.module(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits
    pol = sequence_logprobs(logits, pb.labels)
    n = pb.pairs
    losses = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta)
    return losses.sum() * (1.0 if real else 0.0) * batch.world / batch.n_real
