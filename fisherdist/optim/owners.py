"""Whole-matrix ownership for replicated (DDP) parameters, as distributed Shampoo does.

Every rank holds the whole averaged gradient, but only the owner of a matrix keeps its optimizer state
and computes its update; one coalesced all-gather per dtype then hands every rank the owners' new values.
Optimizer state per rank falls to ~1/N; the assignment is a pure function of the parameter sizes, so
every rank computes the same one without talking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def exchange(params: Sequence[torch.Tensor], owner: Sequence[int], me: int, world: int) -> None:
    """Copy every owner's parameter values to all ranks: one all-gather per dtype of padded flat buffers."""
    for dtype in sorted({p.dtype for p in params}, key=str):
        chosen = [(p, o) for p, o in zip(params, owner) if p.dtype == dtype]
        per_rank = [[p for p, o in chosen if o == r] for r in range(world)]
        width = max(sum(p.numel() for p in ps) for ps in per_rank)
        if width == 0:
            continue
        mine = per_rank[me]
        send = torch.zeros(width, dtype=dtype, device=chosen[0][0].device)
        if mine:
            flat = torch.cat([p.detach().reshape(-1) for p in mine])
            send[: flat.numel()] = flat
        received = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(received, send)
        for r, ps in enumerate(per_rank):
            if r != me:
                _unpack(received[r], ps)


def _unpack(buffer: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    offset = 0
    for p in params:
        p.detach().copy_(buffer[offset: offset + p.numel()].view_as(p))
        offset += p.numel()
