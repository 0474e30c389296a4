"""Fisher-row-weighted low-rank LoRA initialisation on sharded weights (FWSVD style, as FILA and VILA).

Per adapted module: rho_i = sqrt(sum_j I_ij); (U, S, V) = rank-r SVD of diag(rho) W; S <- S / s;
A = (V sqrt S)^T; B = diag(1 / (rho + 1e-5)) U sqrt S; the base becomes W - s*B*A, so the adapted model
starts equal to the original and only the forget-relevant principal part is trainable.

The SVD is randomized (Halko et al., as ``torch.svd_lowrank``) and works on whatever part of W a rank
holds (FSDP2 row shard, ZeRO-3 flat partition, or all of it): every product with W is a sum over ranks of
products with the locally held rows (:func:`~fisherdist.models.lora_base.owned_rows`), reduced in small
d x q collectives; W is never gathered. Every rank then holds the same small factors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from fisherdist.methods.vila.importance import EPS
from fisherdist.models.lora_base import fold_into_base, owned_rows, scaling, set_factors
from fisherdist.models.peft_utils import AdaptedModule

OVERSAMPLE = 10
"""Extra random directions of the randomized SVD (``torch.svd_lowrank``'s q = r + 10 habit)."""


class _RowSharded:
    """diag(rho) W as this rank's row block, with the two products the randomized SVD needs."""

    def __init__(self, weight: torch.Tensor, rho: torch.Tensor) -> None:
        self.r0, block, self.sharded = owned_rows(weight)
        self.rows = int(rho.numel())
        self.device = block.device  # NCCL reduces device tensors; the factors come back to the CPU
        self.m = rho[self.r0 : self.r0 + block.shape[0], None].double().to(self.device) * block.double()

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.sharded and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return t

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """M @ x (d_out x q)."""
        out = torch.zeros(self.rows, x.shape[1], dtype=torch.float64, device=self.device)
        out[self.r0 : self.r0 + self.m.shape[0]] = self.m @ x.to(self.device)
        return self._sum(out).cpu()

    def t_times(self, y: torch.Tensor) -> torch.Tensor:
        """M^T @ y (d_in x q)."""
        return self._sum(self.m.T @ y[self.r0 : self.r0 + self.m.shape[0]].to(self.device)).cpu()


def lowrank_svd(m: _RowSharded, d_in: int, rank: int, niter: int = 2, oversample: int = 10,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V) of the rank-``rank`` randomized SVD with ``niter`` power iterations (collective)."""
    q = min(rank + oversample, m.rows, d_in)
    omega = torch.randn(d_in, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = m.times(omega)
    for _ in range(niter):
        z = m.t_times(torch.linalg.qr(y).Q)
        y = m.times(torch.linalg.qr(z).Q)
    basis = torch.linalg.qr(y).Q
    u_small, s, vt = torch.linalg.svd(m.t_times(basis).T, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vt[:rank].T


def fisher_factors(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, rho: torch.Tensor,
                   lora_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s * B @ A = diag(1 / (rho + eps)) U S V^T (the Fisher-weighted approximation of W)."""
    root = (s / lora_scaling).sqrt()
    return (v * root).T.contiguous(), ((u * root) / (rho[:, None] + EPS)).contiguous()


def module_factors(m: AdaptedModule, row_sums: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Fisher-weighted (A, B) of one module from its row importance (collective)."""
    rho = row_sums.double().clamp_min(0).sqrt()
    weight = m.module.base_layer.weight
    d_in = int(getattr(weight, "ds_shape", weight.shape)[1])
    rank = int(getattr(m.lora_a, "ds_shape", m.lora_a.shape)[0])
    u, s, v = lowrank_svd(_RowSharded(weight, rho), d_in, rank, oversample=OVERSAMPLE, seed=seed)
    return fisher_factors(u, s, v, rho, scaling(m))


def fisher_init(rows: dict[str, torch.Tensor], seed: int = 0) -> Callable[[nn.Module], None]:
    """The ``lora_init`` hook of :func:`~fisherdist.models.sharded_load.load_wrapped`: Fisher-weighted
    factors for every module, then W <- W - s*B*A (the outputs are unchanged)."""

    def init(model: nn.Module) -> None:
        set_factors(model, lambda m: module_factors(m, rows[m.name], seed))
        fold_into_base(model)

    return init


def gaussian_init(sigma: float, seed: int = 0) -> Callable[[nn.Module], None]:
    """VILA's importance pass: both factors ~ N(0, sigma^2) (seeded per module, the same on every rank),
    base unchanged (this adapter only defines the subspace whose Fisher is measured)."""

    def draw(m: AdaptedModule) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed + sum(map(ord, m.name)))
        a_shape = tuple(getattr(m.lora_a, "ds_shape", m.lora_a.shape))
        b_shape = tuple(getattr(m.lora_b, "ds_shape", m.lora_b.shape))
        return torch.randn(a_shape, generator=g) * sigma, torch.randn(b_shape, generator=g) * sigma

    return lambda model: set_factors(model, draw)
