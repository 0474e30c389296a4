"""SUV's differential-Fisher log barrier on the LoRA update, computed shard-locally.

    D = max(F_forbid - F_retain + eps1, eps1)
    R = sum_modules sum_ij log(1 + (BA)_ij^2 / (D_ij + eps2)),   loss += lambda * clip(R, 0, 1e9)

Weights that matter for the forbidden text and not for retain data (large D) are cheap to move; all
others sit behind a log barrier. ``BA`` excludes the LoRA scaling, as in the paper's code.

Deliberate differences from the official repository (github.com/xz-liu/SUV, fisher_utils.py):
  * its ``compute_fisher_base`` adds ``grad.pow(2).sum(dim=0)`` of batch gradients, i.e. sums the squared
    gradient over output rows and broadcasts it; here F is the true per-element diagonal (mean over
    samples of the squared per-sample gradient), from the sharded engine;
  * it calls ``compute_differential_fisher(F_f, F_r, len(retain)/len(forbidden))``, which lands the size
    ratio in the ``fisher_eps`` slot, so the clamp floor is |retain|/|forbidden|; here eps1 is eps1.

Sharding: each rank holds only its fragment of D (the engine's flat range of the base weight, whole rows
under FSDP2, matching its rows of LoRA B). It forms only those entries of BA, in row chunks under
activation checkpointing, and the scalar is the only thing all-reduced. Under ZeRO-3 the LoRA factors exist
only inside the forward, so :meth:`FisherBarrier.factor_gradients` gathers them (they are small), forms
lambda * grad R on detached copies, and the trainer adds it to DeepSpeed's partitioned gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from fisherdist.distributed.collectives import gather_summing_grad, is_dtensor
from fisherdist.models.peft_utils import AdaptedModule

R_CLIP = 1e9


class FragmentLike(Protocol):
    shape: tuple[int, ...]
    start: int
    numel: int


def differential_fisher(f_forbid: torch.Tensor, f_retain: torch.Tensor, eps1: float) -> torch.Tensor:
    return (f_forbid - f_retain + eps1).clamp_min(eps1)


def barrier_sum(delta: torch.Tensor, d: torch.Tensor, eps2: float) -> torch.Tensor:
    """sum log(1 + delta^2 / (d + eps2)) -- the log barrier on a block of weight changes."""
    return torch.log1p(delta.square() / (d + eps2)).sum()


@dataclass
class BarrierTerm:
    """One adapted module: this rank's flat fragment of D and where it sits in the base weight."""

    module: AdaptedModule
    d: torch.Tensor  # flat, fragment of D (float32 or float64)
    start: int
    shape: tuple[int, int]

    def local_sum(self, eps2: float, chunk_rows: int, factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """This fragment's part of R; differentiable in the LoRA factors (or in ``factors`` = (A, B) given)."""
        d_out, d_in = self.shape
        a, b = factors or (self.module.lora_a, self.module.lora_b)
        end = self.start + self.d.numel()
        r0, r1 = self.start // d_in, -(-end // d_in)
        if is_dtensor(b):  # FSDP2: the local rows of B are exactly the fragment's rows
            b_rows, offset = b.to_local(), r0
            if b_rows.shape[0] != r1 - r0:
                raise RuntimeError(f"{self.module.name}: LoRA B shard has {b_rows.shape[0]} rows, D fragment {r1 - r0}")
        else:
            b_rows, offset = b, 0
        a_full = gather_summing_grad(a)
        total = torch.zeros((), dtype=self.d.dtype, device=self.d.device)
        for c0 in range(r0, r1, chunk_rows):
            c1 = min(c0 + chunk_rows, r1)
            lo, hi = max(self.start, c0 * d_in), min(end, c1 * d_in)  # flat range of this chunk inside the fragment
            d_chunk = self.d[lo - self.start : hi - self.start]
            b_chunk = b_rows[c0 - offset : c1 - offset]
            cut = (lo - c0 * d_in, hi - c0 * d_in)
            if torch.is_grad_enabled():
                part = checkpoint(_chunk_sum, b_chunk, a_full, d_chunk, cut, eps2, use_reentrant=False)
            else:
                part = _chunk_sum(b_chunk, a_full, d_chunk, cut, eps2)
            total = total + part.to(total.dtype)
        return total


def _chunk_sum(b_chunk: torch.Tensor, a: torch.Tensor, d: torch.Tensor, cut: tuple[int, int], eps2: float) -> torch.Tensor:
    delta = (b_chunk @ a).reshape(-1)[cut[0] : cut[1]]
    return barrier_sum(delta.to(d.dtype), d, eps2)


class FisherBarrier:
    """The regulariser over all adapted modules of one rank."""

    def __init__(self, terms: list[BarrierTerm], eps2: float, chunk_rows: int = 1024) -> None:
        self.terms = terms
        self.eps2 = eps2
        self.chunk_rows = chunk_rows

    @classmethod
    def build(
        cls, modules: list[AdaptedModule], forbid: dict[str, torch.Tensor], retain: dict[str, torch.Tensor],
        fragments: dict[str, FragmentLike], eps1: float, eps2: float, chunk_rows: int = 1024,
    ) -> FisherBarrier:
        """``forbid`` / ``retain``: this rank's flat Fisher fragments keyed by base-weight FQN."""
        terms = []
        for m in modules:
            fqn = m.base_weight_fqn
            frag = fragments[fqn]
            d = differential_fisher(forbid[fqn], retain[fqn], eps1).reshape(-1)
            if d.numel() != frag.numel:
                raise RuntimeError(f"{fqn}: D fragment has {d.numel()} elements, expected {frag.numel}")
            terms.append(BarrierTerm(m, d, frag.start, tuple(frag.shape)))
        return cls(terms, eps2, chunk_rows)

    def local_value(self) -> torch.Tensor:
        """sum over this rank's fragments (differentiable); summed over ranks it is R."""
        parts = [t.local_sum(self.eps2, self.chunk_rows) for t in self.terms if t.d.numel() > 0]
        if not parts:
            return torch.zeros((), dtype=torch.float32)
        return torch.stack(parts).sum()

    def factor_gradients(self, lam: float) -> tuple[dict[torch.Tensor, torch.Tensor], torch.Tensor]:
        """ZeRO-3 path: ``({LoRA parameter: lambda * dR/dparam}, global R)``, summed over ranks.

        Collective: every rank gathers every factor (DeepSpeed's ``GatheredParameters``), whatever its fragment.
        """
        import deepspeed

        params = [p for t in self.terms for p in (t.module.lora_a, t.module.lora_b)]
        grads = {p: torch.zeros(p.ds_shape, dtype=torch.float32, device=p.device) for p in params}
        total = torch.zeros((), dtype=torch.float64, device=params[0].device)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for t in self.terms:
                if t.d.numel() == 0:
                    continue
                a, b = (x.detach().clone().requires_grad_(True) for x in (t.module.lora_a, t.module.lora_b))
                with torch.enable_grad():
                    part = t.local_sum(self.eps2, self.chunk_rows, (a, b))
                    ga, gb = torch.autograd.grad(part, (a, b))
                grads[t.module.lora_a] += ga.float()
                grads[t.module.lora_b] += gb.float()
                total += part.detach().double()
        flat = torch.cat([total.reshape(1).float()] + [g.reshape(-1) for g in grads.values()])
        if dist.is_initialized():
            dist.all_reduce(flat)
        r = flat[0].double()
        keep = float(r <= R_CLIP) * float(lam)
        out, offset = {}, 1
        for p, g in grads.items():
            out[p] = flat[offset : offset + g.numel()].view_as(g) * keep
            offset += g.numel()
        return out, r.clamp(0, R_CLIP)

    def loss_term(self, lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's contribution to the loss, the global R for logging).

        The backends average gradients over ranks, except FSDP2's direct path into the sharded B rows, so a
        replicated-parameter backend scales the local part by the world size; clip(R, 0, 1e9) acts on the
        global R (zero gradient above the cap) without a host sync.
        """
        local = self.local_value()
        world = dist.get_world_size() if dist.is_initialized() else 1
        total = local.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        sharded = any(is_dtensor(t.module.lora_b) for t in self.terms)
        factor = 1.0 if sharded else float(world)
        keep = (total <= R_CLIP).to(local.dtype)
        return lam * factor * keep * local, total.clamp(0, R_CLIP)
