"""All of the engine's own collectives (kfac-pytorch's "communicator" idea).

Backends fuse statistics into the framework's reduction where they can (DDP, FSDP1); what is left (frozen
parameters whose group has no gradient to reduce, DeepSpeed, which has no reduction hook, K-FAC factors)
goes through :class:`BucketedReduceScatter`: fixed-size buckets, each reduced onto the ranks that own its
elements, so no rank ever holds a full-size send buffer (principle 9). ZeRO and K-FAC stream into it during
backward; :func:`reduce_scatter_to_owners` feeds it a dict of statistics in one go. FSDP2's hook hands
:class:`ColumnBuckets` statistics already in the gradient's row layout, one unit at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from fisherdist.fisher.layout import Placement

DEFAULT_BUCKET_MB = 25.0  # DeepSpeed's default reduce bucket is 5e8 elements; 25 MB matches DDP's bucket_cap_mb
BALANCED_PADDING = 1.125  # reduce-scatter a bucket when padding it to equal per-rank segments costs <= 12.5 %

Deliver = Callable[[str, list[torch.Tensor]], None]


class StatOwner(Protocol):
    """Where reduced statistics go: the accumulator (its placement says how much of a row is real)."""

    placement: Placement

    def deliver(self, fqn: str, fragments: list[torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class Piece:
    """Elements ``[lo, hi)`` of statistic number ``stat`` of ``fqn`` (flattened) that one rank owns in a bucket;
    they sit at ``offset`` of the bucket's send buffer."""

    fqn: str
    stat: int
    lo: int
    hi: int
    rank: int = 0
    offset: int = 0


@dataclass
class Bucket:
    """One collective: ``pieces`` grouped by owner rank. ``stride`` is the per-rank segment when the bucket
    is reduce-scattered (padded to equal segments), None when it is packed and reduced to each owner."""

    pieces: list[Piece]
    lengths: list[int]
    stride: int | None
    fqns: list[str] = field(default_factory=list)  # the parameters it carries, in plan order

    @property
    def numel(self) -> int:
        return self.stride * len(self.lengths) if self.stride is not None else sum(self.lengths)

    def start(self, rank: int) -> int:
        return rank * self.stride if self.stride is not None else sum(self.lengths[:rank])


def cut_buckets(numels: dict[str, int], n_stats: int, bucket_numel: int) -> list[list[Piece]]:
    """Cut the concatenation of every statistic (in ``numels`` order, the statistics of one parameter
    adjacent) into ``bucket_numel``-element runs; a cut may fall inside a parameter."""
    buckets: list[list[Piece]] = [[]]
    room = bucket_numel
    for fqn, n in numels.items():
        for s in range(n_stats):
            lo = 0
            while lo < n:
                if room == 0:
                    buckets.append([])
                    room = bucket_numel
                take = min(room, n - lo)
                buckets[-1].append(Piece(fqn, s, lo, lo + take))
                lo, room = lo + take, room - take
    return [b for b in buckets if b]


def route(run: list[Piece], placement: Placement) -> Bucket:
    """Split a bucket's runs at the owners' range boundaries and lay them out rank by rank."""
    per_rank: list[list[Piece]] = [[] for _ in range(placement.world)]
    for p in run:
        for r, (start, numel) in enumerate(placement.ranges[p.fqn]):
            lo, hi = max(p.lo, start), min(p.hi, start + numel)
            if hi > lo:
                per_rank[r].append(Piece(p.fqn, p.stat, lo, hi, r))
    lengths = [sum(p.hi - p.lo for p in ps) for ps in per_rank]
    total, world = sum(lengths), placement.world
    stride = max(lengths) if world > 1 and max(lengths) * world <= BALANCED_PADDING * total else None
    bucket = Bucket([], lengths, stride)
    for r, ps in enumerate(per_rank):
        offset = bucket.start(r)
        for p in ps:
            bucket.pieces.append(Piece(p.fqn, p.stat, p.lo, p.hi, r, offset))
            offset += p.hi - p.lo
    bucket.fqns = list(dict.fromkeys(p.fqn for p in run))
    return bucket


class BucketedReduceScatter:
    """Sum full-shaped local statistics over ranks onto their owners, one fixed-size bucket at a time.

    :meth:`add` copies a parameter's statistics into the buckets it spans and frees nothing of the caller's;
    a bucket goes out once all its parameters arrived AND every earlier bucket went, so every rank issues
    the same collectives in the same order whatever order the statistics arrive in. :meth:`flush` sends
    what is left, with zeros for statistics that never came (parameters unused on this rank). ``deliver``
    receives this rank's whole fragment of each parameter once its last bucket is reduced; with ``into``
    (this rank's running sums of a parameter, one flat tensor per statistic) each reduced piece is added
    there directly and nothing is assembled. Peak memory: the open buckets (one when arrivals follow
    ``order``) plus, without ``into``, the owned fragments being assembled.
    """

    def __init__(self, placement: Placement, order: list[str], n_stats: int, bucket_numel: int,
                 deliver: Deliver | None, group: dist.ProcessGroup | None = None,
                 into: Callable[[str], list[torch.Tensor]] | None = None) -> None:
        self.placement, self.n_stats, self.deliver, self.group, self.into = placement, n_stats, deliver, group, into
        numels = {f: math.prod(placement.shapes[f]) for f in order}
        self.buckets = [route(run, placement) for run in cut_buckets(numels, n_stats, max(1, bucket_numel))]
        self.of_fqn: dict[str, list[int]] = {f: [] for f in order}
        for j, b in enumerate(self.buckets):
            for f in b.fqns:
                self.of_fqn[f].append(j)
        self.reset()

    def reset(self) -> None:
        self._send: dict[int, torch.Tensor] = {}
        self._missing = [len(b.fqns) for b in self.buckets]
        self._arrived: set[str] = set()
        self._staging: dict[str, list[torch.Tensor]] = {}
        self._next = 0

    def has(self, fqn: str) -> bool:
        return fqn in self._arrived

    def add(self, fqn: str, stats: list[torch.Tensor]) -> None:
        """Take this rank's full-shaped statistics of ``fqn``; reduce every bucket that became complete."""
        self._arrived.add(fqn)
        flat = [t.reshape(-1) for t in stats]
        for j in self.of_fqn[fqn]:
            buf = self._buffer(j, flat[0])
            for p in self.buckets[j].pieces:
                if p.fqn == fqn:
                    buf[p.offset : p.offset + p.hi - p.lo].copy_(flat[p.stat][p.lo : p.hi])
            self._missing[j] -= 1
            self._drain()  # a large parameter's buckets go out one by one, not all open at once

    def flush(self, like: torch.Tensor) -> None:
        """Send every bucket still open (missing statistics count as zeros) and start over."""
        for j in range(self._next, len(self.buckets)):
            self._buffer(j, like)
            self._missing[j] = 0
        self._drain()
        for fqn, buckets in self.of_fqn.items():
            if not buckets and self.deliver is not None:  # zero-element parameter: nothing travels
                self.deliver(fqn, [like.new_zeros(0) for _ in range(self.n_stats)])
        self.reset()

    def _buffer(self, j: int, like: torch.Tensor) -> torch.Tensor:
        if j not in self._send:
            self._send[j] = torch.zeros(self.buckets[j].numel, dtype=like.dtype, device=like.device)
        return self._send[j]

    def _drain(self) -> None:
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._reduce(self._next)
            self._next += 1

    def _reduce(self, j: int) -> None:
        bucket, send, rank = self.buckets[j], self._send.pop(j), self.placement.rank
        mine = send.narrow(0, bucket.start(rank), bucket.lengths[rank])
        if self.placement.world > 1 and bucket.stride is not None:
            mine = send.new_empty(bucket.stride)
            dist.reduce_scatter_single(mine, send, group=self.group)
        elif self.placement.world > 1:
            for r, n in enumerate(bucket.lengths):
                if n:  # packed: one reduce per owner, nothing padded
                    dst = r if self.group is None else dist.get_global_rank(self.group, r)
                    dist.reduce(send.narrow(0, bucket.start(r), n), dst=dst, group=self.group)
        base = bucket.start(rank)
        for p in bucket.pieces:
            if p.rank == rank:
                frag_start = self.placement.ranges[p.fqn][rank][0]
                src = mine[p.offset - base : p.offset - base + p.hi - p.lo]
                if self.into is not None:
                    self.into(p.fqn)[p.stat][p.lo - frag_start : p.hi - frag_start].add_(src)
                else:
                    self._stage(p.fqn, mine)[p.stat][p.lo - frag_start : p.hi - frag_start].copy_(src)
        for fqn in bucket.fqns:
            if self.of_fqn[fqn][-1] == j and self.deliver is not None:  # its last bucket: the fragment is complete
                self.deliver(fqn, self._stage(fqn, mine, pop=True))

    def _stage(self, fqn: str, like: torch.Tensor, pop: bool = False) -> list[torch.Tensor]:
        if fqn not in self._staging:
            numel = self.placement.ranges[fqn][self.placement.rank][1]
            self._staging[fqn] = [like.new_empty(numel) for _ in range(self.n_stats)]
        return self._staging.pop(fqn) if pop else self._staging[fqn]


def reduce_scatter_to_owners(
    stats: dict[str, list[torch.Tensor]], placement: Placement, group: dist.ProcessGroup | None = None,
    bucket_mb: float = DEFAULT_BUCKET_MB,
) -> dict[str, list[torch.Tensor]]:
    """Sum full-shaped local statistics over ranks; return only this rank's fragments of each.

    ``stats`` must have the same keys (in the same order) and list lengths on every rank. They travel in
    ``bucket_mb`` buckets, so the only extra memory is one bucket plus the returned fragments.
    """
    fqns = list(stats)
    if not fqns:
        return {}
    if placement.world == 1:
        return {f: [t.reshape(-1) for t in stats[f]] for f in fqns}
    like = stats[fqns[0]][0]
    out: dict[str, list[torch.Tensor]] = {}
    reducer = BucketedReduceScatter(placement, fqns, len(stats[fqns[0]]), bucket_numel(bucket_mb, like.dtype),
                                    out.__setitem__, group)
    for f in fqns:
        reducer.add(f, stats[f])
    reducer.flush(like)
    return out


def bucket_numel(bucket_mb: float, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` in a ``bucket_mb`` MiB bucket."""
    return max(1, int(bucket_mb * 2**20) // torch.empty((), dtype=dtype).element_size())


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


class ColumnBuckets:
    """Statistics already laid out ``(world, width)`` (row r goes to rank r), reduce-scattered in buckets of
    at most ``bucket_bytes`` (a larger single block goes alone, uncopied) and handed to their sinks.

    The caller adds one parameter's statistics at a time and drops its references, so a rank holds the
    blocks of one bucket, its send copy and its received row, never all of a unit's statistics twice.
    """

    def __init__(self, group: dist.ProcessGroup | None, bucket_bytes: int) -> None:
        self.group, self.bucket_bytes = group, bucket_bytes
        self._blocks: list[torch.Tensor] = []
        self._owners: list[tuple[StatOwner, str, list[int]]] = []  # (sink, fqn, widths of its statistics)
        self._bytes = 0

    def add(self, sink: StatOwner, fqn: str, blocks: list[torch.Tensor]) -> None:
        nbytes = sum(b.numel() * b.element_size() for b in blocks)
        if self._blocks and (self._bytes + nbytes > self.bucket_bytes or blocks[0].dtype != self._blocks[0].dtype):
            self.flush()
        self._blocks += blocks
        self._owners.append((sink, fqn, [b.shape[1] for b in blocks]))
        self._bytes += nbytes

    def flush(self) -> None:
        """Reduce-scatter the open bucket (one collective) and deliver each rank's row of it."""
        if not self._blocks:
            return
        blocks, owners = self._blocks, self._owners
        self._blocks, self._owners, self._bytes = [], [], 0
        send = blocks[0].contiguous() if len(blocks) == 1 else torch.cat(blocks, dim=1)
        del blocks
        recv = send.new_empty(send.shape[1])
        dist.reduce_scatter_single(recv, send.reshape(-1), group=self.group)
        del send
        pos = 0
        for sink, fqn, widths in owners:
            numel = sink.placement.ranges[fqn][sink.placement.rank][1]
            frags = []
            for w in widths:
                frags.append(recv[pos : pos + w][:numel])
                pos += w
            sink.deliver(fqn, frags)
