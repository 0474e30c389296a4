"""Natural GaLore's curvature step: a window of the last s low-rank gradients as the empirical Fisher
lambda*I + G G^T, applied inversely through the Woodbury identity with one s x s solve.

The window is a ring buffer of s slots, zero while unfilled: a zero slot adds a zero row and column to the
s x s system, which leaves the solution unchanged, so shapes never depend on how full the window is.
The Gram matrix G^T G is kept between steps and only the new slot's row is computed (s inner products,
summed over shards), so a step costs 2*s*d flops instead of s^2*d.

Everything runs on a *batch* of k matrices of one shape at once (bmm, batched Cholesky): on small
matrices the ~20 torch calls of a step cost far more than their arithmetic, so paying them once per
shape instead of once per matrix is what makes the step cheap. Each matrix keeps its own window and
Gram tensors (optimizer state stays per parameter); the batch is gathered into reused scratch buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fisherdist.optim.layout import Layout

Reduce = Callable[[torch.Tensor], torch.Tensor]


def woodbury(g: torch.Tensor, hist: torch.Tensor, gram: torch.Tensor, hist_g: torch.Tensor,
             damping: float) -> torch.Tensor:
    """(lambda I + H^T H)^-1 g for a window ``hist`` (s x d, one flattened gradient a row).

    ``gram`` = H H^T (s x s) and ``hist_g`` = H g (s) are passed in because under sharding they are sums
    over ranks; (lambda I + H^T H)^-1 = (I - H^T (lambda I + H H^T)^-1 H) / lambda.
    """
    out = g.clone()
    woodbury_(out.view(1, 1, -1), hist.unsqueeze(0), gram.double().unsqueeze(0).clone(), hist_g.unsqueeze(0),
              damping)
    return out


def woodbury_(g: torch.Tensor, flat: torch.Tensor, system: torch.Tensor, hist_g: torch.Tensor,
              damping: float) -> torch.Tensor:
    """``woodbury`` for k matrices at once, written into ``g`` (k x 1 x d); ``flat`` k x s x d, ``hist_g``
    k x s; ``system`` (k x s x s float64) holds H H^T on entry and is overwritten (solved in float64)."""
    system.diagonal(dim1=-2, dim2=-1).add_(damping)
    chol = torch.linalg.cholesky_ex(system).L  # lambda I + PSD with lambda > 0: positive definite
    z = torch.cholesky_solve(hist_g.double().unsqueeze(-1), chol).transpose(-2, -1)
    return g.baddbmm_(z.to(g.dtype), flat, beta=1.0 / damping, alpha=-1.0 / damping)


def gram_of(hist: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """H H^T over all shards, for a window restored from a checkpoint."""
    flat = hist.reshape(hist.shape[0], -1).to(dtype)
    return layout.reduce(flat @ flat.t()).double()


def natural_step(low: torch.Tensor, hist: torch.Tensor, gram: torch.Tensor, slot: int, damping: float,
                 layout: Layout) -> torch.Tensor:
    """Write ``low`` into window slot ``slot``, update the Gram row, return F^-1 low (same shape as ``low``)."""
    wide = torch.empty((1, hist.shape[0] + 1, *low.shape), dtype=low.dtype)
    wide[0, -1] = low
    natural_steps_(wide, [hist], [gram], slot, damping, layout.reduce)
    return wide[0, -1].clone()


def natural_steps_(wide: torch.Tensor, hists: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], slot: int,
                   damping: float, reduce: Reduce, widened: bool = False) -> torch.Tensor:
    """``natural_step`` for k matrices of one shape, in place: ``wide`` is k x (s + 1) x low shape, whose
    last row holds the low-rank gradients on entry and F^-1 of them on return; its first s rows receive
    the windows widened to the gradients' dtype, or already hold them (``widened``: then only the slot is
    rewritten). ``hists`` and ``grams`` are each matrix's window and Gram cache, updated in place. As in
    the reference code the current gradient joins the window before the solve; a narrower window pairs
    the Gram row with the slot's rounded copy and the right-hand side with the gradient itself.
    """
    k, s = wide.shape[0], wide.shape[1] - 1
    slots = [h[slot] for h in hists]
    torch._foreach_copy_(slots, list(wide[:, s].unbind(0)))
    if widened:
        torch._foreach_copy_(list(wide[:, slot].unbind(0)), slots)
    else:
        torch._foreach_copy_(list(wide[:, :s].unbind(0)), list(hists))
    flat = wide.view(k, s + 1, -1)
    window, g = flat[:, :s], flat[:, s:]
    rows = flat[:, slot::s - slot]  # the slot's widened copy and the gradient, as a view
    products = reduce(torch.bmm(rows, window.transpose(1, 2))).double()  # k x 2 x s: Gram row, H g
    gram = torch.stack(list(grams))
    gram[:, slot, :] = products[:, 0]
    gram[:, :, slot] = products[:, 0]
    torch._foreach_copy_(list(grams), list(gram.unbind(0)))
    woodbury_(g, window, gram, products[:, 1], damping)
    return wide
