"""Gradient projection against an EMA of the retain-loss gradient (SUV's projected DPO).

Per LoRA tensor, the unlearning gradient g is replaced by g - (<g, g_r> / ||g_r||^2) g_r, always (not only
when <g, g_r> < 0 as in A-GEM). The EMA buffer lives next to the gradient, in its sharding (FSDP2: the local
shard), on its device; the two dot products of every tensor are shard-local sums, all-reduced together in
one collective. Under DeepSpeed ZeRO the gradients live in DeepSpeed's buffers: they are read and written
whole through its ``safe_get_full_grad`` / ``safe_set_full_grad`` (LoRA tensors are small), so nothing is
sharded and no collective is needed. The official code starts from ``sliding_preserve_grad=None`` and overwrites g with the
retain gradient; here the first retain gradient seeds the EMA and g is projected.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and any(p.is_shard() for p in t.placements)


def project_out(g: torch.Tensor, r: torch.Tensor, dot: torch.Tensor, norm2: torch.Tensor) -> None:
    """In place: g -= (dot / norm2) r, a no-op where the retain direction is zero."""
    coef = torch.where(norm2 > 0, dot / norm2.clamp_min(torch.finfo(norm2.dtype).tiny), torch.zeros_like(dot))
    g.sub_(coef.to(g.dtype) * r)


class RetainProjector:
    """EMA of the retain gradient per trainable tensor, and the projection of the unlearning gradient."""

    def __init__(self, params: list[nn.Parameter], alpha: float = 0.9, deepspeed: bool = False) -> None:
        self.params = params
        self.alpha = alpha
        self.deepspeed = deepspeed
        self.ema: list[torch.Tensor] | None = None
        self.sharded = [False if deepspeed else _sharded(p) for p in params]

    def _grads(self) -> list[torch.Tensor]:
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_grad

            return [safe_get_full_grad(p).detach().clone() for p in self.params]
        return [_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p)) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current gradient (the retain-loss gradient) into the EMA, then clear it.

        DeepSpeed's ``zero_grad`` leaves its reduced gradient buffers alone (the next backward would add to
        them), so under ZeRO the retain gradient is overwritten with zeros here.
        """
        grads = self._grads()
        if self.deepspeed:
            from deepspeed.utils import safe_set_full_grad

            for p, g in zip(self.params, grads):
                safe_set_full_grad(p, torch.zeros_like(g))
        if self.ema is None:
            self.ema = [g.detach().clone() for g in grads]
            return
        torch._foreach_mul_(self.ema, self.alpha)
        torch._foreach_add_(self.ema, grads, alpha=1 - self.alpha)

    @torch.no_grad()
    def project(self) -> None:
        """Replace each ``.grad`` (the unlearning gradient) by its component orthogonal to the EMA."""
        if self.ema is None:
            raise RuntimeError("RetainProjector.project() before any update()")
        grads = self._grads()
        sums = torch.stack(
            [torch.stack([(g.double() * r.double()).sum(), r.double().square().sum()]) for g, r in zip(grads, self.ema)]
        )  # (tensors, 2): shard-local <g, g_r> and ||g_r||^2
        if dist.is_initialized() and dist.get_world_size() > 1 and any(self.sharded):
            mask = torch.tensor(self.sharded, dtype=sums.dtype, device=sums.device).unsqueeze(1)
            replicated = sums * (1 - mask)
            sharded = sums * mask
            dist.all_reduce(sharded)
            sums = sharded + replicated
        for p, g, r, (dot, norm2) in zip(self.params, grads, self.ema, sums):
            if self.deepspeed:
                from deepspeed.utils import safe_set_full_grad

                project_out(g, r, dot, norm2)
                safe_set_full_grad(p, g)
            elif p.grad is not None:
                project_out(g, r, dot, norm2)
