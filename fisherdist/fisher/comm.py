"""All of the engine's own collectives (kfac-pytorch's "communicator" idea).

Backends fuse statistics into the framework's reduction where they can; what is left (frozen parameters
whose group has no gradient to reduce, DeepSpeed, which has no reduction hook) goes through
:func:`reduce_scatter_to_owners`: one bucketed reduce-scatter that lands every rank's fragments on it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fisherdist.fisher.layout import Placement


def reduce_scatter_to_owners(
    stats: dict[str, list[torch.Tensor]], placement: Placement, group: dist.ProcessGroup | None = None
) -> dict[str, list[torch.Tensor]]:
    """Sum full-shaped local statistics over ranks; return only this rank's fragments of each.

    ``stats`` must have the same keys (in the same order) and list lengths on every rank. Each rank's
    segment is the concatenation of its ranges of every statistic, padded to the longest segment so a
    single ``reduce_scatter_tensor`` moves everything.
    """
    world, rank = placement.world, placement.rank
    fqns = list(stats)
    if not fqns:
        return {}
    if world == 1:
        return {f: [t.reshape(-1) for t in stats[f]] for f in fqns}
    per_rank_len = [sum(placement.ranges[f][r][1] * len(stats[f]) for f in fqns) for r in range(world)]
    seg = max(per_rank_len)
    ref = stats[fqns[0]][0]
    send = torch.zeros(world, seg, dtype=ref.dtype, device=ref.device)
    for r in range(world):
        pieces = [
            t.reshape(-1)[start : start + numel]
            for f in fqns
            for (start, numel) in [placement.ranges[f][r]]
            for t in stats[f]
        ]
        if pieces:
            torch.cat(pieces, out=send[r, : per_rank_len[r]])
    recv = torch.empty(seg, dtype=ref.dtype, device=ref.device)
    dist.reduce_scatter_single(recv, send.view(-1), group=group)
    out: dict[str, list[torch.Tensor]] = {}
    pos = 0
    for f in fqns:
        numel = placement.ranges[f][rank][1]
        out[f] = []
        for _ in stats[f]:
            out[f].append(recv[pos : pos + numel])
            pos += numel
    return out


def dim0_chunk_layout(t: torch.Tensor, world: int) -> torch.Tensor:
    """``t`` padded on dim 0 to ``world * ceil(d0/world)`` rows and viewed as ``(world, chunk_numel)``.

    This is FSDP2's reduce-scatter input layout for one parameter (``torch.ops.fsdp.chunk_cat``), so a
    statistic laid out this way lands on the rank that owns the same rows of the parameter.
    """
    rows = t.shape[0] if t.dim() else 1
    t = t.reshape(rows, -1)
    chunk = math.ceil(rows / world)
    if chunk * world != rows:
        t = torch.cat([t, t.new_zeros(chunk * world - rows, t.shape[1])])
    return t.reshape(world, -1)
