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
