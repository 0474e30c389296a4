"""Natural GaLore's curvature step: a window of the last s low-rank gradients as the empirical Fisher
lambda*I + G G^T, applied inversely through the Woodbury identity with one s x s solve.

The window is a ring buffer of s slots, zero while unfilled: a zero slot adds a zero row and column to the
s x s system, which leaves the solution unchanged, so shapes never depend on how full the window is.
The Gram matrix G^T G is kept between steps and only the new slot's row is computed (s inner products,
summed over shards), so a step costs 2*s*d flops instead of s^2*d; it is recomputed whole only when the
window changed behind its back (a refresh, a checkpoint load, a scratch buffer shared with another batch).

Everything runs on a *batch* of k matrices with d-element low-rank gradients at once (bmm, one batched
float64 solve): on small matrices the ~20 torch calls of a step cost far more than their arithmetic, so
paying them once per batch instead of once per matrix is what makes the step cheap. Each matrix keeps its own window
(optimizer state stays per parameter); the batch's windows are widened into a scratch buffer that the
optimizer reuses, with the batch's Gram matrices, for as long as the windows are left unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fisherdist.optim.batching import Scratch
from fisherdist.optim.layout import Layout

Reduce = Callable[[torch.Tensor], torch.Tensor]


def woodbury(g: torch.Tensor, hist: torch.Tensor, gram: torch.Tensor, hist_g: torch.Tensor,
             damping: float) -> torch.Tensor:
    """(lambda I + H^T H)^-1 g for a window ``hist`` (s x d, one flattened gradient a row).

    ``gram`` = H H^T (s x s) and ``hist_g`` = H g (s) are passed in because under sharding they are sums
    over ranks; (lambda I + H^T H)^-1 = (I - H^T (lambda I + H H^T)^-1 H) / lambda.
    """
    out = g.clone()
    woodbury_(out.view(1, 1, -1), hist.unsqueeze(0), gram.double().unsqueeze(0), hist_g.view(1, 1, -1), damping)
    return out


def woodbury_(g: torch.Tensor, flat: torch.Tensor, gram: torch.Tensor, hist_g: torch.Tensor,
              damping: float) -> torch.Tensor:
    """``woodbury`` for k matrices at once, written into ``g`` (k x 1 x d); ``flat`` k x s x d, ``gram``
    k x s x s and ``hist_g`` k x 1 x s, both float64: the s x s systems are solved in float64."""
    system = torch.add(gram, torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device), alpha=damping)
    z = torch.linalg.solve(system, hist_g, left=False)  # z^T = (H g)^T (lambda I + H H^T)^-1, k x 1 x s
    return g.baddbmm_(z.to(g.dtype), flat, beta=1.0 / damping, alpha=-1.0 / damping)


def natural_step(low: torch.Tensor, hist: torch.Tensor, gram: torch.Tensor, slot: int, damping: float,
                 layout: Layout) -> torch.Tensor:
    """Write ``low`` into window slot ``slot``, update ``gram`` (H H^T), return F^-1 low (``low``'s shape)."""
    scratch = Scratch(hist.shape[0], [tuple(low.shape)], low)
    scratch.lows[0].copy_(low)
    gram.copy_(natural_steps_(scratch, [hist], slot, damping, layout.reduce)[0])
    return scratch.lows[0].clone()


def natural_steps_(scratch: Scratch, hists: Sequence[torch.Tensor], slot: int, damping: float,
                   reduce: Reduce) -> torch.Tensor:
    """``natural_step`` for the k matrices of a batch (``scratch``), in place on ``scratch.lows``;
    returns (and remembers) the updated k x s x s Gram matrices (float64, summed over shards).

    Unless ``scratch`` still holds these windows (``Scratch.holds``), they are widened into it to the
    gradients' dtype and their Gram matrices computed whole; otherwise only the slot's row of both is
    rewritten. As in the reference code the current gradient joins the window before the solve; a
    narrower window pairs the Gram row with the slot's rounded copy and the right-hand side with the
    gradient itself.
    """
    s = scratch.window.shape[1]
    gram = scratch.gram if scratch.holds(hists) else None
    slots = [h[slot] for h in hists]
    torch._foreach_copy_(slots, scratch.lows)
    if gram is None:
        torch._foreach_copy_(scratch.windows, list(hists))
    else:
        torch._foreach_copy_(scratch.slot_rows[slot], slots)
    rows = scratch.wide if gram is None else scratch.pairs[slot]
    products = reduce(torch.bmm(rows, scratch.window_t)).double()  # Gram rows, then H g
    if gram is None:
        gram = products[:, :s].clone()
    else:
        row = products[:, 0]
        gram[:, slot, :] = row
        gram[:, :, slot] = row
    woodbury_(scratch.grad, scratch.window, gram, products[:, -1:], damping)
    scratch.remember(hists, gram)
    return gram
