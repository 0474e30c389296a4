"""Placement: which contiguous range of every flattened target parameter each rank owns.

Every backend's gradient sharding is a set of flat ranges per parameter: FSDP2 (and our DDP / single
layouts) own whole dim-0 row chunks as ``torch.chunk`` cuts them, ZeRO-3 owns ``ceil(numel/world)`` flat
chunks, ZeRO-1/2 and FSDP1 own irregular fragments. One description covers all of them, so the state,
the communication and the checkpoint never branch on the backend (kfac-pytorch's "assignment" idea).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Fragment:
    """This rank's range ``[start, start + numel)`` of ``param.view(-1)``."""

    fqn: str
    shape: tuple[int, ...]
    start: int
    numel: int

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    def row_range(self) -> tuple[int, int]:
        """The dim-0 rows this fragment covers; raises if it does not cover whole rows."""
        row = self.row_numel
        if self.start % row or self.numel % row:
            raise ValueError(f"fragment of {self.fqn} ({self.start}+{self.numel}) is not whole rows of {self.shape}")
        return self.start // row, (self.start + self.numel) // row

    def as_local_shape(self, flat: torch.Tensor) -> torch.Tensor:
        """View a fragment's flat buffer as its rows (``param.to_local()``'s shape under FSDP2)."""
        r0, r1 = self.row_range()
        return flat.view(r1 - r0, *self.shape[1:])


def _row_chunks(shape: tuple[int, ...], world: int) -> list[tuple[int, int]]:
    rows = shape[0] if shape else 1
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    chunk = math.ceil(rows / world)
    out = []
    for r in range(world):
        r0, r1 = min(r * chunk, rows), min((r + 1) * chunk, rows)
        out.append((r0 * row, (r1 - r0) * row))
    return out


def _flat_chunks(numel: int, world: int) -> list[tuple[int, int]]:
    chunk = math.ceil(numel / world)
    return [(min(r * chunk, numel), max(0, min((r + 1) * chunk, numel) - r * chunk)) for r in range(world)]


@dataclass
class Placement:
    """Per-parameter ownership for all ranks: ``ranges[fqn][r] = (start, numel)``."""

    rank: int
    world: int
    shapes: dict[str, tuple[int, ...]]
    ranges: dict[str, list[tuple[int, int]]]

    @classmethod
    def rows(cls, shapes: dict[str, tuple[int, ...]], rank: int, world: int) -> Placement:
        """Dim-0 row chunks as ``torch.chunk`` cuts them (FSDP2 ``Shard(0)``; our DDP and single layouts)."""
        return cls(rank, world, dict(shapes), {f: _row_chunks(s, world) for f, s in shapes.items()})

    @classmethod
    def flat_chunks(cls, shapes: dict[str, tuple[int, ...]], rank: int, world: int) -> Placement:
        """``ceil(numel/world)`` flat chunks of each parameter (DeepSpeed ZeRO-3's partitioning)."""
        return cls(rank, world, dict(shapes), {f: _flat_chunks(math.prod(s), world) for f, s in shapes.items()})

    @classmethod
    def from_local(
        cls, shapes: dict[str, tuple[int, ...]], local: dict[str, tuple[int, int]], group: dist.ProcessGroup | None = None
    ) -> Placement:
        """Irregular fragments known only locally (ZeRO-1/2, FSDP1): gather everyone's ranges once."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        gathered: list[dict[str, tuple[int, int]]] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, {f: local.get(f, (0, 0)) for f in shapes}, group=group)
        return cls(rank, world, dict(shapes), {f: [g[f] for g in gathered] for f in shapes})

    @classmethod
    def owned(cls, shapes: dict[str, tuple[int, ...]], rank: int, world: int,
              group_of: Callable[[str], str] = lambda f: f) -> Placement:
        """Whole tensors, each on one owner rank, for statistics that are inverted whole (Kronecker
        factors). Tensors with the same ``group_of`` key share an owner; groups go largest first onto the
        least loaded rank (KAISA-style greedy balancing)."""
        sizes: dict[str, int] = {}
        for fqn, shape in shapes.items():
            sizes[group_of(fqn)] = sizes.get(group_of(fqn), 0) + math.prod(shape)
        load = [0] * world
        owner_of: dict[str, int] = {}
        for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
            owner_of[key] = min(range(world), key=lambda r: (load[r], r))
            load[owner_of[key]] += sizes[key]
        ranges = {
            f: [(0, math.prod(s)) if r == owner_of[group_of(f)] else (0, 0) for r in range(world)]
            for f, s in shapes.items()
        }
        return cls(rank, world, dict(shapes), ranges)

    def columns(self, fqn: str, full: torch.Tensor) -> torch.Tensor:
        """A full-shaped statistic of ``fqn`` as ``(world, width)``: row r is rank r's range, zero-padded to
        the widest, so a reduce-scatter of these columns lands every range on its owner."""
        flat = full.reshape(-1)
        width = max(n for _, n in self.ranges[fqn])
        out = flat.new_zeros(self.world, width)
        for r, (start, n) in enumerate(self.ranges[fqn]):
            out[r, :n] = flat[start : start + n]
        return out

    def owner(self, fqn: str) -> int:
        """The rank holding most of ``fqn`` (all of it for ``owned`` placements)."""
        return max(range(self.world), key=lambda r: self.ranges[fqn][r][1])

    def fragment(self, fqn: str) -> Fragment:
        start, numel = self.ranges[fqn][self.rank]
        return Fragment(fqn, self.shapes[fqn], start, numel)

    def local_numel(self) -> int:
        return sum(r[self.rank][1] for r in self.ranges.values())

    def total_numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def validate(self) -> None:
        """Every parameter must be covered exactly once (no gaps, no overlaps)."""
        for fqn, ranges in self.ranges.items():
            covered = sorted((s, n) for s, n in ranges if n > 0)
            pos = 0
            for s, n in covered:
                if s != pos:
                    raise AssertionError(f"placement of {fqn}: gap or overlap at {pos} (next range starts {s})")
                pos += n
            if pos != math.prod(self.shapes[fqn]):
                raise AssertionError(f"placement of {fqn}: covers {pos} of {math.prod(self.shapes[fqn])} elements")
