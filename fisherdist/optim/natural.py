"""Natural GaLore's curvature step: a window of the last s low-rank gradients as the empirical Fisher
lambda*I + G G^T, applied inversely through the Woodbury identity with one s x s solve.

The window is a ring buffer of s slots, zero while unfilled: a zero slot adds a zero row and column to the
s x s system, which leaves the solution unchanged, so shapes never depend on how full the window is.
The Gram matrix G^T G is kept between steps and only the new slot's row is computed (s inner products,
summed over shards), so a step costs 2*s*d flops instead of s^2*d. The correction is written into the
gradient's own buffer, and a window narrower than the gradient is widened into a reused scratch buffer
(fresh large tensors cost a page fault per page on CPU, more than the arithmetic here).
"""

from __future__ import annotations

import torch

from fisherdist.optim.layout import Layout


def woodbury(g: torch.Tensor, hist: torch.Tensor, gram: torch.Tensor, hist_g: torch.Tensor,
             damping: float) -> torch.Tensor:
    """(lambda I + H^T H)^-1 g for a window ``hist`` (s x d, one flattened gradient a row).

    ``gram`` = H H^T (s x s) and ``hist_g`` = H g (s) are passed in because under sharding they are sums
    over ranks; (lambda I + H^T H)^-1 = (I - H^T (lambda I + H H^T)^-1 H) / lambda.
    """
    return woodbury_(g.clone(), hist, gram, hist_g, damping)


def woodbury_(g: torch.Tensor, hist: torch.Tensor, gram: torch.Tensor, hist_g: torch.Tensor,
              damping: float) -> torch.Tensor:
    """``woodbury`` written into ``g`` (1-D, contiguous)."""
    system = gram.double().clone()
    system.diagonal().add_(damping)
    chol = torch.linalg.cholesky_ex(system).L  # lambda I + PSD with lambda > 0: positive definite
    z = torch.cholesky_solve(hist_g.double().unsqueeze(-1), chol).squeeze(-1)
    return g.addmv_(hist.t(), z.to(g.dtype), alpha=-1.0).div_(damping)


def gram_of(hist: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """H H^T over all shards, for a window restored from a checkpoint."""
    flat = hist.reshape(hist.shape[0], -1).to(dtype)
    return layout.reduce(flat @ flat.t()).double()


def natural_step(low: torch.Tensor, hist: torch.Tensor, gram: torch.Tensor, slot: int, damping: float,
                 layout: Layout) -> torch.Tensor:
    """Write ``low`` into window slot ``slot``, update the Gram row, return F^-1 low (same shape as ``low``)."""
    return natural_step_(low.clone(), hist, gram, slot, damping, layout)


def natural_step_(low: torch.Tensor, hist: torch.Tensor, gram: torch.Tensor, slot: int, damping: float,
                  layout: Layout, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``natural_step`` in place on ``low`` (contiguous); ``scratch`` (``hist``'s shape in ``low``'s dtype)
    receives the widened window when the window is narrower.

    As in the reference code the current gradient joins the window before the solve. A narrower window
    pairs the Gram row with the slot's rounded copy and the right-hand side with ``low`` itself.
    """
    s = hist.shape[0]
    hist[slot].copy_(low)
    flat = hist.reshape(s, -1)
    if hist.dtype != low.dtype:
        wide = scratch if scratch is not None else torch.empty(hist.shape, dtype=low.dtype, device=low.device)
        flat = wide.copy_(hist).view(s, -1)
    g = low.view(-1)
    products = flat @ g if hist.dtype == low.dtype else torch.cat([flat @ flat[slot], flat @ g])
    products = layout.reduce(products).double()
    gram[slot, :] = products[:s]
    gram[:, slot] = products[:s]
    woodbury_(g, flat, gram, products[-s:], damping)
    return low
