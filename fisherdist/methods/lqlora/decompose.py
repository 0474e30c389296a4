"""The LQ decomposition W ~ Q + L1 L2: alternate a (Fisher-scaled) rank-r SVD of W - Q with quantizing
W - L1 L2, stop as soon as the weighted error rises, and return the best iterate (the official code returns
the last one, which is the slightly worse iterate that triggered the stop)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fisherdist.methods.lqlora.fisher_weights import FisherWeights, sq_error
from fisherdist.models.quant import QConfig, QuantizedTensor, quantize


@dataclass
class LQResult:
    """Q (packed), L1 [out, r], L2 [r, in], and the weighted squared error of every iterate."""

    q: QuantizedTensor
    l1: torch.Tensor
    l2: torch.Tensor
    errors: list[float]
    best: int

    @property
    def error(self) -> float:
        return self.errors[self.best]


def lowrank(a: torch.Tensor, rank: int, svd: str = "randomized", oversample: int = 10) -> tuple[torch.Tensor, ...]:
    """(U sqrt(S), sqrt(S) V^T) truncated to ``rank``: exact or randomized (``torch.svd_lowrank``) SVD."""
    if svd == "exact":
        u, s, vt = torch.linalg.svd(a, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(a, q=min(rank + oversample, *a.shape), niter=2)
        vt = v.T
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def weighted_lowrank(a: torch.Tensor, fisher: FisherWeights | None, rank: int, svd: str,
                     oversample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of ``a`` minimising the error weighted by the two-sided row x column scales."""
    if fisher is None:
        l1, l2 = lowrank(a, rank, svd, oversample)
        return l1, l2
    d_row, d_col = fisher.scales()
    l1, l2 = lowrank(d_row * a * d_col, rank, svd, oversample)
    return l1 / d_row, l2 / d_col


def lq_decompose(weight: torch.Tensor, cfg: QConfig, rank: int, iters: int = 100,
                 fisher: FisherWeights | None = None, svd: str = "randomized", oversample: int = 10,
                 seed: int = 0) -> LQResult:
    """Alternate SVD and quantization for at most ``iters`` steps (Q starts at 0); ``seed`` fixes the
    randomized SVD's sketches so a matrix decomposes identically on any rank."""
    if weight.ndim != 2 or not 1 <= rank <= min(weight.shape) or iters < 1:
        raise ValueError(f"need a 2-D weight, 1 <= rank <= {min(weight.shape)} and iters >= 1; got shape "
                         f"{tuple(weight.shape)}, rank {rank}, iters {iters}")
    w = weight.detach().to(torch.float32)
    q_deq = torch.zeros_like(w)
    errors: list[float] = []
    best: tuple[QuantizedTensor, torch.Tensor, torch.Tensor] | None = None
    best_i = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(iters):
            l1, l2 = weighted_lowrank(w - q_deq, fisher, rank, svd, oversample)
            lr = l1 @ l2
            q = quantize(w - lr, cfg)
            q_deq = q.dequantize()
            errors.append(sq_error(w - q_deq - lr, fisher))
            if best is None or errors[-1] < errors[best_i]:
                best, best_i = (q, l1, l2), step
            if step > 0 and not errors[-1] < errors[-2]:
                break
    assert best is not None and all(math.isfinite(e) for e in errors)
    return LQResult(best[0], best[1], best[2], errors, best_i)
