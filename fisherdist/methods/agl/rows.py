"""Row-split penalties on every backend: each rank forms a penalty's partial sums over its block of output
rows, and one all-reduce of a (modules x terms) table of scalars gives the totals.

Both penalties of ``fisherdist agl`` (AGL's and the EWC baseline's) are sums over output rows of per-module
terms. Where a rank's rows and the small factors come from depends on the backend:

* replicated factors (``none``, ``ddp``, ``zero1``, ``zero2``): rows ``[rank*d/W, (rank+1)*d/W)`` of the
  whole factors; the backend averages gradients over ranks, so the local loss is scaled by W;
* FSDP2: the rows of LoRA B this rank holds (its ``Shard(0)`` block, no communication); the small factors
  (A, C, A_a: r or m rows) are gathered with a ``Partial`` gradient (summed over ranks on the way back); the
  penalty's gradient lands in the shards directly (not averaged), so the local loss is not scaled;
* ZeRO-3: the factors exist only inside the forward, so the penalty is evaluated on gathered detached
  copies and its gradient, summed over ranks, is added to DeepSpeed's partitioned gradients.

The table's all-reduce carries the value only: each rank back-propagates through its own partial sums
(``summed = parts + (sum - parts)``, gradient 1 to the local part), which is what all three routes need.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fisherdist.distributed.collectives import all_reduce_sum, gather_summing_grad, is_dtensor, rank_world
from fisherdist.models.peft_utils import AdaptedModule, adapted_modules
from fisherdist.recipes.trainer import StepBatch, TrainHook

Fetch = Callable[[torch.Tensor], torch.Tensor]
"""A trainable parameter -> its whole value, differentiable in this rank's copy or shard."""


@dataclass(frozen=True)
class RowBlock:
    """This rank's output rows ``[lo, hi)`` of one module and the matching rows of LoRA B."""

    lo: int
    hi: int
    b: torch.Tensor


def row_block(b: torch.Tensor, fetch: Fetch, rank: int, world: int) -> RowBlock:
    """FSDP2: the rows this rank's shard holds (``torch.chunk`` blocks); otherwise an even split of the
    whole B (``fetch``)."""
    if is_dtensor(b):
        local: torch.Tensor = b.to_local()  # type: ignore[attr-defined]
        lo = min(rank * -(-b.shape[0] // world), b.shape[0])
        return RowBlock(lo, lo + local.shape[0], local)
    whole = fetch(b)
    lo, hi = rank * whole.shape[0] // world, (rank + 1) * whole.shape[0] // world
    return RowBlock(lo, hi, whole[lo:hi])


class RowPenalty(TrainHook, ABC):
    """A penalty over every adapted module, from per-rank row partial sums (see the module docstring).
    Subclasses give :meth:`params` (the tensors a module's terms read), :meth:`partials` and :meth:`finish`."""

    def __init__(self, wrapped: Any) -> None:
        self.w = wrapped
        self.mods = adapted_modules(wrapped.unwrapped)
        self.rank, self.world = rank_world()
        self.last: dict[str, torch.Tensor] = {}

    @abstractmethod
    def params(self, mod: AdaptedModule) -> list[torch.Tensor]:
        """The module's trainable tensors the penalty reads (gathered under ZeRO-3)."""

    @abstractmethod
    def partials(self, fetch: Fetch) -> torch.Tensor:
        """This rank's partial sums, ``(modules, terms)``, differentiable through ``fetch`` / the B rows."""

    @abstractmethod
    def finish(self, total: torch.Tensor) -> dict[str, torch.Tensor]:
        """The penalty (``"loss"``) and its logged parts from the table summed over ranks."""

    def _loss(self, fetch: Fetch) -> torch.Tensor:
        parts = self.partials(fetch)
        summed = all_reduce_sum(parts.detach().clone())
        out = self.finish(parts + (summed - parts.detach()))
        self.last = {k: v.detach() for k, v in out.items()}
        return out["loss"]

    def extra_loss(self, batch: StepBatch) -> torch.Tensor | None:
        if self.w.params_gathered_in_forward:
            return None
        direct = any(is_dtensor(m.lora_b) for m in self.mods)  # FSDP2: gradients into shards are not averaged
        return self._loss(gather_summing_grad) * (1.0 if direct else float(self.world))

    def extra_grads(self, batch: StepBatch) -> dict[torch.Tensor, torch.Tensor]:
        """ZeRO-3: the penalty's full gradient of every factor, from gathered copies (collective)."""
        if not self.w.params_gathered_in_forward:
            return {}
        params = [p for m in self.mods for p in self.params(m)]
        name = {id(p): n for n, p in self.w.named_trainable()}
        full = self.w.gather_trainable()
        leaves = {id(p): full[name[id(p)]].to(p.device).requires_grad_(True) for p in params}
        with torch.enable_grad():
            loss = self._loss(lambda p: leaves[id(p)])
            grads = torch.autograd.grad(loss, [leaves[id(p)] for p in params], allow_unused=True)
        flat = all_reduce_sum(torch.cat([(g if g is not None else torch.zeros_like(leaves[id(p)])).reshape(-1)
                                         for p, g in zip(params, grads)]))
        out, offset = {}, 0
        for p in params:
            n = leaves[id(p)].numel()
            out[p] = flat[offset:offset + n].view_as(leaves[id(p)])
            offset += n
        return out
