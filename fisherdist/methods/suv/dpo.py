"""DPO on (prompt, chosen, rejected) triples, with the adapter-disabled model as reference.

L = -log sigma(beta [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))]),
sequence log-probabilities summed over the continuation tokens only (prompt and padding are masked).
Chosen and rejected go through one concatenated forward, as in TRL, so each step runs one policy and one
reference forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fisherdist.models.peft_utils import adapter_disabled

IGNORE = -100


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label_t | < t) over the non-ignored labels of each row, ``(B,)`` (HF shift by one)."""
    logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=1)


def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
) -> torch.Tensor:
    """Per-pair DPO loss ``(B,)``; logsigmoid keeps it finite for large margins."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


@dataclass
class PairBatch:
    """Chosen rows first, then rejected rows, right-padded to one length."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def collate_pairs(
    prompts: Sequence[list[int]], chosen: Sequence[list[int]], rejected: Sequence[list[int]],
    pad_id: int, max_length: int,
) -> PairBatch:
    """Token ids -> one batch of ``prompt+chosen`` rows then ``prompt+rejected`` rows; labels mask the prompt.

    Sequences longer than ``max_length`` lose continuation tokens from the end (the prompt is kept whole
    where it fits), so a pair is never scored on a truncated prompt.
    """
    rows, labels = [], []
    for conts in (chosen, rejected):
        for p, c in zip(prompts, conts):
            p = list(p)[: max_length - 1]
            c = list(c)[: max_length - len(p)]
            rows.append(p + c)
            labels.append([IGNORE] * len(p) + c)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, row_labels) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(row_labels)] = torch.tensor(row_labels)
        att[i, : len(r)] = 1
    return PairBatch(ids, att, lab)


def reference_logprobs(model: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
    """Sequence log-probs of the base model (adapter off, no grad) for every row of ``batch``."""
    with adapter_disabled(model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return sequence_logprobs(logits, batch.labels)


def dpo_step_loss(module: torch.nn.Module, peft_model: torch.nn.Module, batch: PairBatch, beta: float) -> torch.Tensor:
    """Mean DPO loss of one pair batch; ``module`` is the (wrapped) callable, ``peft_model`` the PEFT model."""
    ref = reference_logprobs(peft_model, batch)
    logits = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    pol = sequence_logprobs(logits, batch.labels)
    n = batch.pairs
    return dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta).mean()
