"""AlignGuard-LoRA's penalties (reference ``methods.md`` section 1a), per module, from factored updates.

Parameterisation (the choice section 1a asks for; an exact projector or a disjoint mask would make the
collision terms vanish identically): every adapted linear carries TWO separately parameterised updates,

    dW_A = s * U C A_a        alignment adapter, confined to span(U) of that module's alignment basis
    dW_T = s * B A_t          task adapter, a plain LoRA update, free to point anywhere

and the model uses W + dW_A + dW_T. U (d_out x m, orthonormal) and its eigenvalues come from the engine's
output-side K-FAC factor G of the aligned model on alignment data, one basis per module. dW_T is not a
projection of dW_A's complement, so <dW_A, dW_T> and the coordinate overlaps are generically non-zero and
both collision terms act; the Fisher term acts on dW_A, the curvature terms on dW_T. The curvature is the
alignment data's own Kronecker curvature G (x) A: it penalises the task update where it changes the layer's
output on the *alignment inputs* in the directions the alignment loss is sensitive to (an output-only
penalty cannot tell a harmful request from a benign one and blocks the task as much as it protects
refusals). Each factor is kept as its top eigenpairs plus an isotropic residual level, G ~ U Lam U^T +
sigma (I - U U^T) and A ~ V Mu V^T + rho (I - V V^T) (sigma, rho: the mean of the factor's other
eigenvalues), so nothing outside the top subspaces is free (a top-m-only penalty is routed around):

    L_A  = sum_i lam_i ||u_i^T dW_A||^2                       (= s^2 tr(Lam C (A_a A_a^T) C^T))
    L_T  = tr(U Lam U^T dW_T V Mu V^T dW_T^T)                 curvature: both top subspaces
    L_R  = tr(G~ dW_T A~ dW_T^T) - L_T                        residual: the rest of the Kronecker form
    E_RO = mean_jk w_jk |dW_A,jk| |dW_T,jk|,  w = 1 + beta * sigmoid(|dW_A + dW_T| - tau)
    E_GS = <dW_A, dW_T>^2 / (||dW_A||^2 ||dW_T||^2 + eps)
    L    = lambda_A L_A + lambda_T (L_T + L_R) + lambda_NC (alpha E_RO + (1 - alpha) E_GS),  summed over modules

With M = A_t A~ A_t^T (r x r) and P = U^T B (m x r), tr(G~ dW_T A~ dW_T^T) = s^2 [tr((Lam - sigma) P M P^T)
+ sigma tr(B M B^T)]: r x r and r x d products only, never a d x d matrix.

Sharding: a rank holds rows ``[lo, hi)`` of U and B (FSDP2 ``Shard(0)``) and the small factors C, A_a, A_t
and (gathered, like them) the whole B for P = U^T B. The row sums (E_RO, the Gram inner products,
sigma tr(B M B^T)) are partial sums over the rank's rows; L_A and the P terms are formed whole on every rank,
which adds 1/world of them; only the (modules x terms) table of scalars is all-reduced (:func:`combine`).
Inner products come from r x r Gram matrices, <X1 Y1, X2 Y2> = tr((X1^T X2)(Y2 Y1^T)); only E_RO
materialises rows of the updates, ``chunk`` rows at a time, checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from fisherdist.config import Section

TERMS = ("fisher", "curvature", "residual", "overlap", "inner", "norm_a", "norm_t")
"""The per-module partial sums, in the order :func:`local_sums` returns them."""


class AglWeights(Section):
    """The reference's weights (section 1a, third-party defaults: paper values unconfirmed)."""

    lambda_a: float = Field(0.25, ge=0, description="alignment-critical Fisher penalty on dW_A")
    lambda_t: float = Field(0.5, ge=0, description="task curvature penalty on dW_T")
    residual: bool = Field(True, description="add L_R, the Kronecker curvature outside the top subspaces")
    lambda_nc: float = Field(0.1, ge=0, description="collision terms (overlap + separation)")
    alpha: float = Field(0.5, ge=0, le=1, description="share of Riemannian overlap in the collision term")
    beta: float = Field(4.0, ge=0, description="overlap weight gain")
    tau: float = Field(0.01, description="overlap weight threshold")
    eps: float = Field(1e-12, gt=0)


@dataclass
class ModuleFactors:
    """One module's tensors as this rank holds them: rows ``[lo, hi)`` of ``u``, ``h`` and ``b``."""

    u: torch.Tensor  # (rows, m) alignment basis rows (output side)
    lam: torch.Tensor  # (m,) eigenvalues
    sigma: torch.Tensor  # () output-side residual level (mean of G's other eigenvalues)
    v: torch.Tensor  # (d_in, k) input-side eigenvectors
    mu: torch.Tensor  # (k,) input-side eigenvalues
    rho: torch.Tensor  # () input-side residual level
    c: torch.Tensor  # (m, r_a) alignment adapter coefficients
    a_align: torch.Tensor  # (r_a, d_in)
    b: torch.Tensor  # (rows, r) task adapter B rows
    a_task: torch.Tensor  # (r, d_in)
    u_all: torch.Tensor  # (d_out, m) the whole U
    b_all: torch.Tensor  # (d_out, r) the whole B (gathered: its gradient is summed over ranks)
    scale: float  # LoRA s = alpha / r
    replicated_share: float = 1.0  # 1/world: L_A is computed whole on every rank


def _gram_inner(x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """<X1 Y1, X2 Y2>_F without forming either product."""
    return torch.trace((x1.T @ x2) @ (y2 @ y1.T))


def _overlap_sum(xa: torch.Tensor, ya: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, w: AglWeights,
                 chunk: int) -> torch.Tensor:
    """sum_jk w_jk |dW_A,jk| |dW_T,jk| over the local rows, ``chunk`` rows materialised at a time (under
    activation checkpointing: backward recomputes a chunk instead of keeping every module's rows)."""
    total = xa.new_zeros(())
    for lo in range(0, xa.shape[0], chunk):
        args = (xa[lo:lo + chunk], ya, xt[lo:lo + chunk], yt, w.beta, w.tau)
        part = checkpoint(_overlap_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _overlap_chunk(*args)
        total = total + part
    return total


def _overlap_chunk(xa: torch.Tensor, ya: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, beta: float,
                   tau: float) -> torch.Tensor:
    da, dt = xa @ ya, xt @ yt
    return ((1 + beta * torch.sigmoid((da + dt).abs() - tau)) * da.abs() * dt.abs()).sum()


def _kronecker(f: ModuleFactors, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_T, L_R) of one module: the P terms whole (times ``share``), sigma tr(B M B^T) over the local rows."""
    q = f.a_task @ f.v  # (r, k): A_t V
    m_top = (q * f.mu) @ q.T
    m_all = m_top + f.rho * (f.a_task @ f.a_task.T - q @ q.T)  # A_t A~ A_t^T
    p = f.u_all.T @ f.b_all  # (m, r)
    s2 = f.scale ** 2
    top = s2 * share * (f.lam[:, None] * (p @ m_top) * p).sum()
    whole = s2 * share * ((f.lam - f.sigma)[:, None] * (p @ m_all) * p).sum()
    rows = s2 * f.sigma * ((f.b @ m_all) * f.b).sum()
    return top, whole + rows - top


def local_sums(f: ModuleFactors, w: AglWeights, chunk: int = 1024) -> torch.Tensor:
    """This rank's partial sums of :data:`TERMS` for one module (differentiable)."""
    s = f.scale
    xa, ya = s * (f.u @ f.c), f.a_align  # dW_A rows = xa @ ya
    xt, yt = s * f.b, f.a_task  # dW_T rows = xt @ yt
    coef = s * (f.c @ f.a_align)  # U^T dW_A (U orthonormal), whole on every rank
    fisher = (f.lam[:, None] * coef.square()).sum() * f.replicated_share
    curvature, residual = _kronecker(f, f.replicated_share)
    return torch.stack([fisher, curvature, residual, _overlap_sum(xa, ya, xt, yt, w, chunk),
                        _gram_inner(xa, ya, xt, yt), _gram_inner(xa, ya, xa, ya), _gram_inner(xt, yt, xt, yt)])


Reduce = Callable[[torch.Tensor], torch.Tensor]


def combine(partials: torch.Tensor, numel: torch.Tensor, w: AglWeights, reduce: Reduce | None = None) -> dict[str, torch.Tensor]:
    """The penalty from every module's partial sums ``(modules, len(TERMS))``; ``reduce`` sums them over
    ranks (one differentiable all-reduce of the whole table); ``numel`` is each module's d_out * d_in."""
    total = reduce(partials) if reduce is not None else partials
    fisher, curv, resid, over, inner, na, nt = total.unbind(1)
    e_ro = over / numel
    e_gs = inner.square() / (na * nt + w.eps)
    collision = w.alpha * e_ro + (1 - w.alpha) * e_gs
    curvature = curv.sum() + (resid.sum() if w.residual else 0.0)
    loss = w.lambda_a * fisher.sum() + w.lambda_t * curvature + w.lambda_nc * collision.sum()
    return {"loss": loss, "fisher": fisher.sum(), "curvature": curv.sum(), "residual": resid.sum(), "overlap": e_ro.sum(),
            "separation": e_gs.sum()}
