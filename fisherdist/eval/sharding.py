"""Split a list of work items across ranks and gather the results so every rank returns the same list.

Every rank processes the same *number* of items (the short ranks repeat item 0 and drop its result), so
a function that runs collectives per batch — a forward through an FSDP / ZeRO-3 sharded model — makes
the same calls on every rank and cannot hang.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch.distributed as dist

from fisherdist.distributed.collectives import rank_world

T = TypeVar("T")
R = TypeVar("R")


def map_sharded(items: Sequence[T], fn: Callable[[list[T]], list[R]]) -> list[R]:
    """``fn(items)`` computed on contiguous per-rank chunks and gathered in the original order."""
    rank, size = rank_world()
    if size == 1 or not items:
        return fn(list(items))
    per = -(-len(items) // size)
    local = list(items[rank * per : (rank + 1) * per])
    real = len(local)
    local += [items[0]] * (per - real)
    results = fn(local)
    if len(results) != per:
        raise RuntimeError(f"map_sharded: fn returned {len(results)} results for {per} items")
    gathered: list[list[R] | None] = [None] * size
    dist.all_gather_object(gathered, results[:real])
    return [r for part in gathered for r in part or []]
