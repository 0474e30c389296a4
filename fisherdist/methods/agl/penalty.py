"""AlignGuard-LoRA's penalties (reference ``methods.md`` section 1a), per module, from factored updates.

Parameterisation (the choice section 1a asks for; an exact projector or a disjoint mask would make the
collision terms vanish identically): every adapted linear carries TWO separately parameterised updates,

    dW_A = s * U C A_a        alignment adapter, confined to span(U) of that module's alignment basis
    dW_T = s * B A_t          task adapter, a plain LoRA update, free to point anywhere

and the model uses W + dW_A + dW_T. U (d_out x m, orthonormal) and its eigenvalues come from the engine's
output-side K-FAC factor of the aligned model on alignment data, one basis per module. dW_T is not a
projection of dW_A's complement, so <dW_A, dW_T> and the coordinate overlaps are generically non-zero and
both collision terms act; the Fisher term acts on dW_A, the curvature term on dW_T. The curvature is the
alignment data's own Kronecker curvature diag(h) (x) V Mu V^T: it penalises the task update where it
changes the layer's output on the *alignment inputs* (an output-only penalty cannot tell a harmful request
from a benign one and blocks the task as much as it protects refusals).

    L_A  = sum_i lam_i ||u_i^T dW_A||^2                       (= s^2 tr(Lam C (A_a A_a^T) C^T))
    L_T  = sum_j h_j sum_k mu_k (dW_T[j, :] . v_k)^2          h = diag of the same output factor, (v_k, mu_k)
                                                              the top input-side eigenpairs (K-FAC A)
    E_RO = mean_jk w_jk |dW_A,jk| |dW_T,jk|,  w = 1 + beta * sigmoid(|dW_A + dW_T| - tau)
    E_GS = <dW_A, dW_T>^2 / (||dW_A||^2 ||dW_T||^2 + eps)
    L    = lambda_A L_A + lambda_T L_T + lambda_NC (alpha E_RO + (1 - alpha) E_GS),  summed over modules

Sharding: every quantity is a sum over output rows, so a rank holding rows ``[lo, hi)`` of U, h and B (FSDP2
``Shard(0)``) and the small factors C, A_a, A_t whole computes partial sums, and only those scalars are
all-reduced (:func:`combine`). Inner products come from r x r Gram matrices, <X1 Y1, X2 Y2> =
tr((X1^T X2)(Y2 Y1^T)); only E_RO materialises rows of the updates, ``chunk`` rows at a time, checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from fisherdist.config import Section

TERMS = ("fisher", "curvature", "overlap", "inner", "norm_a", "norm_t")
"""The per-module partial sums, in the order :func:`local_sums` returns them."""


class AglWeights(Section):
    """The reference's weights (section 1a, third-party defaults: paper values unconfirmed)."""

    lambda_a: float = Field(0.25, ge=0, description="alignment-critical Fisher penalty on dW_A")
    lambda_t: float = Field(0.5, ge=0, description="task curvature penalty on dW_T")
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
    h: torch.Tensor  # (rows,) curvature diagonal rows
    v: torch.Tensor  # (d_in, k) input-side eigenvectors
    mu: torch.Tensor  # (k,) input-side eigenvalues
    c: torch.Tensor  # (m, r_a) alignment adapter coefficients
    a_align: torch.Tensor  # (r_a, d_in)
    b: torch.Tensor  # (rows, r) task adapter B rows
    a_task: torch.Tensor  # (r, d_in)
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


def local_sums(f: ModuleFactors, w: AglWeights, chunk: int = 1024) -> torch.Tensor:
    """This rank's partial sums of :data:`TERMS` for one module (differentiable)."""
    s = f.scale
    xa, ya = s * (f.u @ f.c), f.a_align  # dW_A rows = xa @ ya
    xt, yt = s * f.b, f.a_task  # dW_T rows = xt @ yt
    coef = s * (f.c @ f.a_align)  # U^T dW_A (U orthonormal), whole on every rank
    fisher = (f.lam[:, None] * coef.square()).sum() * f.replicated_share
    proj = yt @ f.v  # (r, k): dW_T V = xt @ proj
    curvature = (f.h[:, None] * (xt @ ((proj * f.mu) @ proj.T)) * xt).sum()
    return torch.stack([fisher, curvature, _overlap_sum(xa, ya, xt, yt, w, chunk), _gram_inner(xa, ya, xt, yt),
                        _gram_inner(xa, ya, xa, ya), _gram_inner(xt, yt, xt, yt)])


Reduce = Callable[[torch.Tensor], torch.Tensor]


def combine(partials: torch.Tensor, numel: torch.Tensor, w: AglWeights, reduce: Reduce | None = None) -> dict[str, torch.Tensor]:
    """The penalty from every module's partial sums ``(modules, len(TERMS))``; ``reduce`` sums them over
    ranks (one differentiable all-reduce of the whole table); ``numel`` is each module's d_out * d_in."""
    total = reduce(partials) if reduce is not None else partials
    fisher, curv, over, inner, na, nt = total.unbind(1)
    e_ro = over / numel
    e_gs = inner.square() / (na * nt + w.eps)
    collision = w.alpha * e_ro + (1 - w.alpha) * e_gs
    loss = w.lambda_a * fisher.sum() + w.lambda_t * curv.sum() + w.lambda_nc * collision.sum()
    return {"loss": loss, "fisher": fisher.sum(), "curvature": curv.sum(), "overlap": e_ro.sum(),
            "separation": e_gs.sum()}
