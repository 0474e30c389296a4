"""Which matrices take their low-rank step together as one batch.

A Llama has one copy of each projection shape per layer; stacking those copies lets the projection's
Adam and Natural GaLore's window step run as batched torch calls (bmm, batched Cholesky), paying the
per-call overhead once per shape instead of once per matrix. Only whole local matrices of one shape,
side and step batch together; a row-sharded (FSDP2) matrix runs alone, since its reductions are per matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fisherdist.optim.layout import Layout

BATCH_BYTES = 64 * 2 ** 20
"""At most this much float scratch for one batch's stacked windows (or low-rank gradients without one)."""


def batches(grads: Sequence[torch.Tensor], layouts: Sequence[Layout], sides: Sequence[str], steps: Sequence[int],
            rank: int, history: int) -> list[list[int]]:
    """Indices into ``grads`` grouped into batches, each at most ``BATCH_BYTES`` of scratch (at least one)."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, (grad, layout, side, step) in enumerate(zip(grads, layouts, sides, steps)):
        key = (i,) if layout.sharded else (tuple(grad.shape), grad.dtype, side, step)
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        rows, cols = grads[members[0]].shape
        low = (rows if sides[members[0]] == "right" else cols) * min(rank, rows, cols)
        size = max(history, 1) * low * grads[members[0]].element_size()
        per = max(1, BATCH_BYTES // size)
        out += [members[start: start + per] for start in range(0, len(members), per)]
    return out


class Scratch:
    """One batch's reused buffers (not state: never checkpointed) and views of them, made once.

    ``wide`` is k x (s + 1) x low shape: rows 0..s-1 take the widened windows of Natural GaLore (none for
    GaLore), row s the low-rank gradients; ``update`` receives Adam's step. ``seen`` records the windows
    ``wide`` was filled from (with their version counters) and ``gram`` their Gram matrices, so the next
    step of the same batch reuses both while no window has changed since.
    """

    def __init__(self, k: int, s: int, shape: tuple[int, ...], like: torch.Tensor) -> None:
        self.wide = torch.empty((k, s + 1, *shape), dtype=like.dtype, device=like.device)
        self.update = torch.empty((k, *shape), dtype=like.dtype, device=like.device)
        self.lows, self.updates = list(self.wide[:, s].unbind(0)), list(self.update.unbind(0))
        flat = self.wide.view(k, s + 1, -1)
        self.flat, self.window, self.grad = flat, flat[:, :s], flat[:, s:]
        self.window_t = self.window.transpose(1, 2)
        self.windows = list(self.wide[:, :s].unbind(0))
        self.slot_rows = [list(self.wide[:, j].unbind(0)) for j in range(s)]
        self.pairs = [flat[:, j::s - j] for j in range(s)]  # slot j's row and the gradient, as a view
        self.seen: list[tuple[torch.Tensor, int]] = []
        self.gram: torch.Tensor | None = None

    def holds(self, hists: Sequence[torch.Tensor]) -> bool:
        """Whether ``wide`` and ``gram`` still mirror exactly these windows (same tensors, unmodified)."""
        seen = self.seen
        return len(seen) == len(hists) and all(a is h and v == h._version for (a, v), h in zip(seen, hists))

    def remember(self, hists: Sequence[torch.Tensor], gram: torch.Tensor) -> None:
        self.seen, self.gram = [(h, h._version) for h in hists], gram

    def forget(self) -> None:
        self.seen, self.gram = [], None
