"""Natural GaLore's curvature step: a window of the last s low-rank gradients as the empirical Fisher
lambda*I + G G^T, applied inversely through the Woodbury identity with one s x s solve.

The window is a ring buffer of s slots, zero while unfilled: a zero slot adds a zero row and column to the
s x s system, which leaves the solution unchanged, so shapes never depend on how full the window is.
The Gram matrix G^T G is kept between steps and only the new slot's row is computed (s inner products,
summed over shards), so a step costs 2*s*d flops instead of s^2*d.
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
    system = gram.double().clone()
    system.diagonal().add_(damping)
    z = torch.cholesky_solve(hist_g.double().unsqueeze(-1), torch.linalg.cholesky(system))
    return (g - hist.t().to(g.dtype) @ z.squeeze(-1).to(g.dtype)) / damping


def gram_of(hist: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """H H^T over all shards, for a window restored from a checkpoint."""
    flat = hist.reshape(hist.shape[0], -1).to(dtype)
    return layout.reduce(flat @ flat.t()).double()


def natural_step(low: torch.Tensor, hist: torch.Tensor, gram: torch.Tensor, slot: int, damping: float,
                 layout: Layout) -> torch.Tensor:
    """Write ``low`` into window slot ``slot``, update the Gram row, return F^-1 low (same shape as ``low``).

    As in the reference code the current gradient joins the window before the solve.
    """
    hist[slot].copy_(low)
    flat = hist.reshape(hist.shape[0], -1).to(low.dtype)
    g = low.reshape(-1)
    # one pass when the window keeps the gradient exactly; a narrower window pairs with its rounded copy
    row = flat @ g if hist.dtype == low.dtype else flat @ flat[slot]
    products = layout.reduce(torch.cat([row, flat @ g]) if hist.dtype != low.dtype else row).double()
    gram[slot, :] = products[: hist.shape[0]]
    gram[:, slot] = products[: hist.shape[0]]
    return woodbury(g, flat, gram, products[-hist.shape[0]:], damping).reshape(low.shape)
