"""What the fused backend hooks share: the sinks registered on one framework hook, and a reduce-scatter
that carries statistics next to the gradient in the gradient's dtype and in their own dtype otherwise.

Several accumulators (or one per named purpose: a diagonal Fisher and K-FAC, forget and retain) may watch
one model; a framework takes one hook per model (DDP) or per unit (FSDP1, FSDP2), so that hook serves a
``SinkSet`` and closing an accumulator removes exactly its sink.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from fisherdist.fisher.backends.base import StatSink

#: one statistic block for the reduce-scatter: (sink, fqn, [(world, width) tensor per statistic])
Entry = tuple[StatSink, str, list[torch.Tensor]]


class SinkSet:
    """The accumulators one framework hook feeds, in registration order."""

    def __init__(self) -> None:
        self.sinks: list[StatSink] = []

    def add(self, sink: StatSink) -> None:
        self.sinks.append(sink)

    def discard(self, sink: StatSink) -> bool:
        """Remove ``sink``; True when no sink is left (the framework's default hook may come back)."""
        self.sinks = [s for s in self.sinks if s is not sink]
        return not self.sinks

    def recording(self) -> Iterator[StatSink]:
        return (s for s in self.sinks if s.recording())


def split_by_dtype(blocks: list[torch.Tensor], dtype: torch.dtype) -> dict[torch.dtype, list[int]]:
    """Indices of ``blocks`` per dtype, ``dtype`` (the gradient's) first: those ride the gradient's
    collective, every other dtype gets one collective of its own (statistics are never cast)."""
    out: dict[torch.dtype, list[int]] = {dtype: []}
    for i, b in enumerate(blocks):
        out.setdefault(b.dtype, []).append(i)
    return out


def reduce_scatter_columns(base: torch.Tensor | None, blocks: list[torch.Tensor], group: dist.ProcessGroup | None,
                           op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> tuple[torch.Tensor | None, list[torch.Tensor], list[bool]]:
    """Reduce-scatter ``[base | blocks]`` (each ``(world, width)``), this rank's row of each comes back.

    Blocks in ``base``'s dtype share its collective (and its ``op``: the caller undoes an average on them,
    flagged True); blocks in another dtype are summed in one collective per dtype, uncast.
    """
    dtype = base.dtype if base is not None else blocks[0].dtype
    outs: list[torch.Tensor] = [torch.empty(0)] * len(blocks)
    fused = [False] * len(blocks)
    base_out = None
    for dt, idx in split_by_dtype(blocks, dtype).items():
        with_base = dt == dtype and base is not None
        parts = ([base] if with_base and base is not None else []) + [blocks[i] for i in idx]
        if not parts:
            continue
        send = torch.cat(parts, dim=1)
        recv = torch.empty(send.shape[1], dtype=dt, device=send.device)
        dist.reduce_scatter_single(recv, send.reshape(-1), group=group, op=op if with_base else dist.ReduceOp.SUM)
        pos = 0
        if with_base and base is not None:
            base_out, pos = recv[: base.shape[1]], base.shape[1]
        for i in idx:
            outs[i], fused[i] = recv[pos : pos + blocks[i].shape[1]], with_base
            pos += blocks[i].shape[1]
    return base_out, outs, fused
