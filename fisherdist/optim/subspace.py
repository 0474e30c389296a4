"""The GaLore projector: which side of the gradient it acts on, how it is found, and projecting through it.

``right``: P is r x n, the low-rank gradient is G P^T (m x r) and rows stay where G's rows are.
``left``: P is m x r, the low-rank gradient is P^T G (r x n), a sum over row shards.
Under FSDP2 (row shards) no rank forms the whole gradient: ``exact`` takes the eigenvectors of the
all-reduced n x n Gram matrix (each rank decomposing its share of a batch's), ``randomized`` runs Halko
et al.'s range finder with Cholesky-QR, whose only collectives are k x k, n x k and k x n sums; a batch of
matrices of one shape sums each as one stacked tensor. On a whole matrix ``exact`` is ``torch.linalg.svd``,
exactly as galore-torch computes it (the parity mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fisherdist.errors import ConfigError
from fisherdist.optim.layout import Layout

SIDES = {"std": ("right", "left"), "reverse_std": ("left", "right"), "right": ("right", "right"),
         "left": ("left", "left")}
"""galore-torch's proj_type -> side for (m >= n, m < n)."""


def side_of(proj_type: str, shape: tuple[int, ...]) -> str:
    if proj_type not in SIDES:
        raise ConfigError(f"GaLore param group: proj_type={proj_type!r}; expected one of {sorted(SIDES)} "
                          "(two-sided 'full' is not supported)")
    tall, wide = SIDES[proj_type]
    return tall if shape[0] >= shape[1] else wide


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; anything narrower is decomposed in float32, as galore-torch does."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def project(grad: torch.Tensor, proj: torch.Tensor, side: str, layout: Layout,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """The low-rank gradient of this rank's rows: G P^T (local rows), or P^T G summed over shards; into
    ``out`` when given (a reused buffer of the result's shape)."""
    a, b = (grad, proj.t()) if side == "right" else (proj.t(), grad)
    low = a @ b if out is None else torch.mm(a, b, out=out)
    return low if side == "right" else layout.reduce(low)


def add_back(target: torch.Tensor, update: torch.Tensor, proj: torch.Tensor, side: str, alpha: float) -> None:
    """target += alpha * (this rank's rows of the projected-back update), in place with no full-size
    temporary (``update`` whole for ``left``, local rows for ``right``)."""
    a, b = (update, proj) if side == "right" else (proj, update)
    target.addmm_(a.to(target.dtype), b.to(target.dtype), alpha=alpha)


def refresh(grads: Sequence[torch.Tensor], layout: Layout, side: str, rank: int, subspace: str,
            sketches: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
    """New projectors from this step's gradients, in their dtype, for k matrices of ``layout``'s global
    shape (k = 1 for a whole matrix); under sharding each reduction is one collective for all k.

    ``sketches`` are (oversample, power iterations, seed) per matrix for the randomized mode; a seed must
    be equal on every rank sharing the matrix (it names the parameter and step, not the rank).
    """
    gs = [grad.to(compute_dtype(grad.dtype)) for grad in grads]
    g = torch.stack(gs) if len(gs) > 1 else gs[0].unsqueeze(0)  # no copy of a lone float32 gradient
    r = min(rank, *layout.shape[:2])
    if subspace == "randomized":
        proj = _randomized(g, layout, side, r, sketches)
    elif layout.sharded:
        proj = _gram_eig(g, layout, side, r)
    else:
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        sign = _signs(vh[:, :r])
        proj = vh[:, :r] * sign[..., None] if side == "right" else u[..., :r] * sign[:, None]
    return [p.to(grad.dtype).contiguous() for p, grad in zip(proj.unbind(0), grads)]


def _signs(vh: torch.Tensor) -> torch.Tensor:
    """+-1 per right singular vector (rows of each k x r x n ``vh``) making its largest-magnitude entry positive.

    Adam's moments outlive a refresh (as in galore-torch), so the sign of a new basis vector changes the
    next steps; fixing it from V, which every rank holds whole, makes the result independent of sharding.
    """
    pick = vh.abs().argmax(dim=-1, keepdim=True)
    return torch.where(vh.gather(-1, pick) < 0, -1.0, 1.0).to(vh.dtype).squeeze(-1)


def _gram_eig(g: torch.Tensor, layout: Layout, side: str, r: int) -> torch.Tensor:
    """Top-r singular vectors from the all-reduced Grams G^T G (k x n x n): V directly, U rows as G_i V / sigma.

    The k eigendecompositions are dealt out to the ranks (matrix j to rank j mod N) and their V and sigma
    shared with one all-reduce of a zero-filled k x (n + 1) x r stack, so each rank pays ~1/N of them.
    """
    gram = layout.reduce(g.mT @ g)
    index, parts = layout.world()
    evals, evecs = torch.linalg.eigh(gram[index::parts].double())
    top = evecs[..., -r:].flip(-1)
    top = top * _signs(top.mT)[:, None, :]
    shared = torch.zeros((g.shape[0], gram.shape[-1] + 1, r), dtype=torch.float64, device=g.device)
    shared[index::parts, :-1] = top
    shared[index::parts, -1] = evals[:, -r:].flip(-1).clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    layout.reduce(shared)
    top, sigma = shared[:, :-1], shared[:, -1:]
    proj: torch.Tensor = top.mT if side == "right" else (g.double() @ top) / sigma
    return proj.to(g.dtype)


def _orthonormal_rows(y: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Orthonormal columns for k row-sharded tall matrices: Cholesky-QR twice, shifted for rank deficiency."""
    q = y.double()
    for _ in range(2):
        w = layout.reduce(q.mT @ q)
        diagonal = w.diagonal(dim1=-2, dim2=-1)
        diagonal.add_(1e-13 * diagonal.sum(-1, keepdim=True) + torch.finfo(torch.float64).tiny)
        chol = torch.linalg.cholesky(w, upper=True)
        q = torch.linalg.solve_triangular(chol, q, upper=True, left=False)
    return q.to(y.dtype)


def _randomized(g: torch.Tensor, layout: Layout, side: str, r: int,
                sketches: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Halko, Martinsson & Tropp's randomized SVD (range finder with power iterations) on k row shards."""
    oversample, power_iters, _ = sketches[0]
    k = min(r + oversample, *layout.shape[:2])
    omega = torch.stack([torch.randn(layout.shape[1], k, generator=torch.Generator().manual_seed(seed),
                                     dtype=torch.float64) for _, _, seed in sketches]).to(g.device, g.dtype)
    y = g @ omega
    for _ in range(power_iters):
        y = _orthonormal_rows(y, layout)
        z = torch.linalg.qr(layout.reduce(g.mT @ y).double()).Q.to(g.dtype)
        y = g @ z
    q = _orthonormal_rows(y, layout)
    b = layout.reduce(q.mT @ g).double()
    ub, _, vh = torch.linalg.svd(b, full_matrices=False)
    sign = _signs(vh[:, :r])
    ub, vh = ub[..., :r] * sign[:, None, :], vh[:, :r] * sign[..., None]
    proj: torch.Tensor = vh.to(g.dtype) if side == "right" else q @ ub.to(g.dtype)
    return proj
