"""Losses the methods share: SFT, DPO, NPO, IHL and gradient difference, with their reference policy.

Conventions: ``labels`` carry ``IGNORE`` on prompt and padding tokens (HF shift by one inside), so every
loss scores the continuation only. Sequence-level losses (DPO, NPO) use summed sequence log-probabilities
and return one value per row; token-level ones (SFT, IHL, gradient difference) return per-row sums with
:func:`label_tokens` as their weights, so a data-parallel caller can divide by the global token count.

The reference policy is the same model, never a second copy: the adapter switched off (TRL's default with
PEFT), or, for a method that rewrites the base under its initial adapter (FILA, VILA, LQ-LoRA, where
"adapter off" is not the starting model), :class:`FrozenAdapter` swapping the initial adapter back in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fisherdist.distributed.collectives import all_reduce_sum
from fisherdist.models.peft_utils import adapter_disabled

IGNORE = -100


@dataclass
class TokenBatch:
    """Right-padded rows; ``labels`` is ``IGNORE`` on the prompt and the padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate_prompted(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int,
                     max_length: int) -> TokenBatch:
    """``prompt + continuation`` rows, labels masking the prompt. A row longer than ``max_length`` loses
    continuation tokens from its end (the prompt is kept whole where it fits), so a row is never scored on
    a truncated prompt."""
    rows, labels = [], []
    for p, c in zip(prompts, continuations):
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
    return TokenBatch(ids, att, lab)


class PairBatch(TokenBatch):
    """Preference pairs: the ``prompt+chosen`` rows, then the ``prompt+rejected`` rows (one forward)."""

    @property
    def pairs(self) -> int:
        return int(self.input_ids.shape[0]) // 2


def collate_pairs(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                  rejected: Sequence[Sequence[int]], pad_id: int, max_length: int) -> PairBatch:
    """Preference pairs as one batch (chosen rows first), each row as :func:`collate_prompted` makes it."""
    b = collate_prompted([*prompts, *prompts], [*chosen, *rejected], pad_id, max_length)
    return PairBatch(b.input_ids, b.attention_mask, b.labels)


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-softmax of the predicting positions, targets clamped to valid ids, mask of scored tokens)."""
    logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    target = labels[:, 1:]
    return torch.log_softmax(logits, dim=-1), target.clamp_min(0), target != IGNORE


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label_t | < t) over the scored labels of each row, ``(B,)``."""
    logp, target, mask = _shifted(logits, labels)
    return (logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask).sum(dim=1)


def label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Scored tokens per row, ``(B,)`` (the weights of the token-level losses)."""
    return (labels[:, 1:] != IGNORE).sum(dim=1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row summed NLL of the continuation (prompt masked); divide by the token count for the mean."""
    return -sequence_logprobs(logits, labels)


def token_mean_share(module: nn.Module, batch: TokenBatch, real: bool, world: int) -> torch.Tensor:
    """This rank's share of the step's global token-mean NLL: its summed NLL x ``world`` / the step's token
    count over all ranks, so the backend's gradient average is the gradient of the global token mean whatever
    the world size; ``real`` False (a rank with only padding this step) gives it zero weight."""
    tokens = all_reduce_sum((label_tokens(batch.labels).sum() * int(real)).double().reshape(1))
    logits = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return sft_loss(logits, batch.labels).sum() * int(real) * world / tokens.to(logits.dtype)


def step_mean(share: torch.Tensor, world: int) -> float:
    """The step's global value of a loss whose per-rank shares sum to ``world`` times it (the logged metric)."""
    return float(all_reduce_sum(share.detach().double().reshape(1).clone())) / world


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair -log sigma(beta [(pi_c - ref_c) - (pi_r - ref_r)]); logsigmoid keeps it finite."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def npo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row NPO on forget sequences: -(2/beta) log sigma(beta (NLL_theta - NLL_ref)), from summed
    sequence log-probabilities (NLL = -log p)."""
    return -(2.0 / beta) * F.logsigmoid(beta * (reference - policy))


def ihl_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum over scored tokens of the inverted hinge max(0, 1 + p(y_t) - max_{v != y_t} p(v))."""
    logp, target, mask = _shifted(logits, labels)
    p = logp.exp()
    p_true = p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    p_other = p.scatter(-1, target.unsqueeze(-1), float("-inf")).amax(dim=-1)
    return (torch.clamp(1 + p_true - p_other, min=0) * mask).sum(dim=1)


def gradient_difference(forget_nll: torch.Tensor, forget_tokens: torch.Tensor, retain_nll: torch.Tensor,
                        retain_tokens: torch.Tensor, retain_weight: float = 1.0) -> torch.Tensor:
    """-NLL(D_f) + lambda NLL(D_r), each the token mean of per-row summed NLLs (:func:`sft_loss`)."""
    return -forget_nll.sum() / forget_tokens.sum() + retain_weight * retain_nll.sum() / retain_tokens.sum()


def _local(p: torch.Tensor) -> torch.Tensor:
    """The storage this rank holds of a parameter: ZeRO-3 partition, FSDP2 shard, or the tensor itself."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p.data


class FrozenAdapter:
    """A frozen copy of the trainable tensors as they are now (this rank's shard only, a few MB at 70B);
    :meth:`swapped_in` runs the model with it in place of the current adapter."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.saved = [_local(p).detach().clone() for p in self.params]

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        with torch.no_grad():
            current = [_local(p).clone() for p in self.params]
            try:
                for p, s in zip(self.params, self.saved):
                    _local(p).copy_(s)
                yield
            finally:
                for p, c in zip(self.params, current):
                    _local(p).copy_(c)


def reference_logprobs(model: nn.Module, batch: TokenBatch, frozen: FrozenAdapter | None = None,
                       module: nn.Module | None = None) -> torch.Tensor:
    """Sequence log-probs of the reference policy, no grad: ``frozen`` swapped in, else the adapter off.
    ``model`` is the PEFT model; ``module`` the (wrapped) callable to run, default ``model``."""
    run = module if module is not None else model
    ctx = frozen.swapped_in() if frozen is not None else adapter_disabled(model)
    with ctx, torch.no_grad():
        logits = run(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return sequence_logprobs(logits, batch.labels)
