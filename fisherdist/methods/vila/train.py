"""The unlearning step: a forget term (GD, IHL or NPO, from the shared losses) + lambda x retain NLL.

Data parallelism as in the SFT example: every term is a sum over this rank's rows times W over the
step's global count (tokens for the token-level terms, rows for NPO), so the backend's gradient average
is the gradient of the global mean on any world size. The retain rows of step s are drawn from a
generator seeded by (seed, s), the same global draw on every world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fisherdist.distributed.collectives import all_reduce_sum, rank
from fisherdist.methods.vila.config import VilaTrain
from fisherdist.methods.vila.data import Pair, collate
from fisherdist.recipes.losses import (
    FrozenAdapter,
    ihl_loss,
    label_tokens,
    npo_loss,
    reference_logprobs,
    sequence_logprobs,
    sft_loss,
)
from fisherdist.recipes.trainer import StepBatch


@dataclass
class UnlearnLoss:
    """``loss(batch)`` for :class:`~fisherdist.recipes.trainer.Trainer`."""

    wrapped: Any
    forget: list[Pair]
    retain: list[Pair]
    settings: VilaTrain
    pad_id: int
    reference: FrozenAdapter | None = None

    def _batch(self, pairs: list[Pair], idx: list[int]) -> dict[str, torch.Tensor]:
        device = next(self.wrapped.unwrapped.parameters()).device
        valid = [i >= 0 for i in idx]
        return collate([pairs[max(i, 0)] for i in idx], valid, self.pad_id, self.settings.max_length, device)

    def _retain_idx(self, batch: StepBatch) -> list[int]:
        g = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + batch.step)
        glob = torch.randint(len(self.retain), (batch.n_real,), generator=g).tolist()
        per, me = len(batch.mine), rank()
        mine = glob[me * per : (me + 1) * per]
        return mine + [-1] * (per - len(mine))

    def _logits(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.wrapped.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    def _forget_term(self, b: dict[str, torch.Tensor], world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(forget term, per-row NLL for logging), already globally normalised."""
        valid, logits = b["valid"].to(torch.float64), self._logits(b)
        nll = sft_loss(logits, b["labels"])
        if self.settings.loss == "npo":
            ref = reference_logprobs(self.wrapped.unwrapped, _token_batch(b), self.reference, module=self.wrapped.module)
            rows = npo_loss(sequence_logprobs(logits, b["labels"]), ref, self.settings.beta)
            count = all_reduce_sum(valid.sum().reshape(1))
        else:
            rows = -nll if self.settings.loss == "gd" else ihl_loss(logits, b["labels"])
            count = all_reduce_sum((label_tokens(b["labels"]) * valid).sum().reshape(1))
        scale = world / count.clamp_min(1).to(logits.dtype)
        return (rows * valid.to(rows.dtype)).sum() * scale, nll

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        fb, rb = self._batch(self.forget, batch.mine), self._batch(self.retain, self._retain_idx(batch))
        term, _ = self._forget_term(fb, batch.world)
        r_valid = rb["valid"].to(torch.float64)
        r_tokens = all_reduce_sum((label_tokens(rb["labels"]) * r_valid).sum().reshape(1))
        r_nll = (sft_loss(self._logits(rb), rb["labels"]) * r_valid).sum()
        return term + self.settings.retain_weight * r_nll * batch.world / r_tokens.clamp_min(1).to(r_nll.dtype)


def _token_batch(b: dict[str, torch.Tensor]) -> Any:
    from fisherdist.recipes.losses import TokenBatch

    return TokenBatch(b["input_ids"], b["attention_mask"], b["labels"])
