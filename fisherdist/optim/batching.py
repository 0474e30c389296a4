"""Which matrices take their low-rank step together as one batch, and the batch's reused buffers.

A Llama has one copy of each projection shape per layer; stacking those copies lets the low-rank Adam and
Natural GaLore's window step run as batched torch calls (bmm, batched solve), paying the per-call overhead
once per batch instead of once per matrix. The window step only sees flattened low-rank gradients, so
matrices batch together whenever their low-rank gradients have as many elements (a Llama's gate, up and
down projections all give intermediate x r), whatever their shapes and sides. Row-sharded (FSDP2) matrices
batch with those of the same global shape, side and mesh, so that every rank forms the same batches (its
local row counts may differ from its peers') and each reduction of a batch is one collective on a stacked
tensor instead of one per matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fisherdist.optim.layout import Layout, chunk_bounds

BATCH_BYTES = 64 * 2 ** 20
"""At most this much float scratch for one batch's stacked windows (or low-rank gradients without one)."""


def low_shape(grad: torch.Tensor, side: str, rank: int) -> tuple[int, int]:
    """The low-rank gradient's shape: rows x r (``right``) or r x columns (``left``)."""
    rows, cols = grad.shape
    r = min(rank, rows, cols)
    return (rows, r) if side == "right" else (r, cols)


def batches(grads: Sequence[torch.Tensor], layouts: Sequence[Layout], sides: Sequence[str], steps: Sequence[int],
            rank: int, history: int) -> list[list[int]]:
    """Indices into ``grads`` grouped into batches, each at most ``BATCH_BYTES`` of scratch (at least one)."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, (grad, layout, side, step) in enumerate(zip(grads, layouts, sides, steps)):
        rows, r = low_shape(grad, side, rank)
        key = (layout, side, grad.dtype, step) if layout.sharded else (rows * r, grad.dtype, step)
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        first = members[0]
        size = history_bytes(grads[first], layouts[first], sides[first], rank, history)
        per = max(1, BATCH_BYTES // max(1, size))
        out += [members[start: start + per] for start in range(0, len(members), per)]
    return out


def history_bytes(grad: torch.Tensor, layout: Layout, side: str, rank: int, history: int) -> int:
    """One matrix's widened window (or low-rank gradient) in scratch; for a row shard, the largest shard's
    (the first), so that ranks holding fewer rows still cut the same batches."""
    if not layout.sharded:
        return max(history, 1) * math.prod(low_shape(grad, side, rank)) * grad.element_size()
    rows, cols = low_shape(torch.empty(layout.shape, device="meta"), side, rank)
    _, world = layout.world()
    start, end = chunk_bounds(rows if side == "right" else cols, world, 0)  # rows (right) or columns (left)
    return max(history, 1) * (end - start) * (cols if side == "right" else rows) * grad.element_size()


def refresh_chunks(batch: list[int], layout: Layout) -> list[list[int]]:
    """A batch cut for its refresh: a row-sharded batch into chunks of at most ``BATCH_BYTES`` of stacked
    float32 gradient shards and float64 n x n Gram matrices (equal on every rank), whole matrices one by one
    (they may differ in shape, and their exact SVD is galore-torch's per-matrix call)."""
    if not layout.sharded:
        return [[i] for i in batch]
    m, n = layout.shape
    _, world = layout.world()
    start, end = chunk_bounds(m, world, 0)
    per = max(1, BATCH_BYTES // ((end - start) * n * 4 + n * n * 8))
    return [batch[i: i + per] for i in range(0, len(batch), per)]


class Scratch:
    """One batch's reused buffers (not state: never checkpointed) and views of them, made once.

    ``wide`` is k x (s + 1) x d: rows 0..s-1 take the widened windows of Natural GaLore (none for GaLore),
    row s the low-rank gradients (each matrix's of its own shape, d elements); ``update`` receives Adam's
    step. ``seen`` records the windows ``wide`` was filled from (with their version counters) and ``gram``
    their Gram matrices, so the next step of the same batch reuses both while no window has changed since.
    """

    def __init__(self, s: int, shapes: Sequence[tuple[int, ...]], like: torch.Tensor) -> None:
        k, d = len(shapes), math.prod(shapes[0])
        self.wide = torch.empty((k, s + 1, d), dtype=like.dtype, device=like.device)
        self.update = torch.empty((k, d), dtype=like.dtype, device=like.device)
        self.lows = [row.view(shape) for row, shape in zip(self.wide[:, s].unbind(0), shapes)]
        self.updates = [row.view(shape) for row, shape in zip(self.update.unbind(0), shapes)]
        self.window, self.grad = self.wide[:, :s], self.wide[:, s:]
        self.window_t = self.window.transpose(1, 2)
        self.windows = [row.view(s, *shape) for row, shape in zip(self.window.unbind(0), shapes)]
        self.slot_rows = [[row.view(shape) for row, shape in zip(self.wide[:, j].unbind(0), shapes)]
                          for j in range(s)]
        self.pairs = [self.wide[:, j::s - j] for j in range(s)]  # slot j's row and the gradient, as a view
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
