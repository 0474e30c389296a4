"""Which elements of every parameter each rank holds, per backend, without a live engine.

FSDP2, ZeRO-3 and DDP use the engine's own :class:`~fisherdist.fisher.layout.Placement` constructors (the
same code the accumulator runs). ZeRO-1/2 and FSDP1 cut flattened groups, so their arithmetic is redone
here from the frameworks' rules; ``tests/test_plan_layout.py`` checks the ZeRO-1/2 cut against a live
DeepSpeed engine's ``lp_fragment_address`` and the FSDP2 / ZeRO-3 storage against the running tensors.
"""

from __future__ import annotations

import math

from fisherdist.fisher.layout import Placement

Shapes = dict[str, tuple[int, ...]]
BACKENDS = ("fsdp1", "fsdp2", "zero1", "zero2", "zero3", "ddp", "none")  # none: one process, no wrapper
SHARDS_PARAMS = {"fsdp1", "fsdp2", "zero3"}
DEEPSPEED_ALIGNMENT = 2  # ZeRO-1/2 pad the flat group to a multiple of nccl_start_alignment_factor * world


def _cut_flat(shapes: Shapes, total: int, world: int) -> dict[str, list[tuple[int, int]]]:
    """Parameters laid end to end in a flat buffer of ``total`` elements, cut into ``world`` equal parts:
    each parameter's ``(start, numel)`` of its own ``view(-1)`` on every rank."""
    part = total // world
    ranges: dict[str, list[tuple[int, int]]] = {}
    offset = 0
    for fqn, shape in shapes.items():
        numel = math.prod(shape)
        per_rank = []
        for r in range(world):
            lo, hi = max(offset, r * part), min(offset + numel, (r + 1) * part)
            per_rank.append((lo - offset, hi - lo) if hi > lo else (0, 0))
        ranges[fqn] = per_rank
        offset += numel
    return ranges


def zero12_total(shapes: Shapes, world: int) -> int:
    """DeepSpeed ZeRO-1/2's flattened param group: padded to a multiple of ``2 * world`` elements."""
    align = DEEPSPEED_ALIGNMENT * world
    return math.ceil(sum(math.prod(s) for s in shapes.values()) / align) * align


def zero12(shapes: Shapes, rank: int, world: int) -> Placement:
    """ZeRO-1/2 fragments of the trainable parameters of ONE param group, in group order (DeepSpeed's
    ``flatten_dense_tensors_aligned`` + equal ``get_data_parallel_partitions``; no round-robin reorder)."""
    return Placement(rank, world, dict(shapes), _cut_flat(shapes, zero12_total(shapes, world), world))


def fsdp1(shapes: Shapes, units: list[str], rank: int, world: int) -> Placement:
    """FSDP1: one FlatParameter per unit (decoder layers, then the root with the rest), padded to a
    multiple of ``world`` and cut into equal shards (intra-flat alignment padding is not modelled)."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for group in _unit_groups(shapes, units):
        sub = {f: shapes[f] for f in group}
        total = math.ceil(sum(math.prod(s) for s in sub.values()) / world) * world
        ranges.update(_cut_flat(sub, total, world))
    return Placement(rank, world, dict(shapes), ranges)


def statistic_placement(backend: str, shapes: Shapes, trainable: set[str], units: list[str],
                        rank: int, world: int) -> Placement:
    """Where the engine keeps Fisher state of ``shapes`` (cf. each ``fisher/backends`` adapter)."""
    if backend == "zero3":
        return Placement.flat_chunks(shapes, rank, world)
    if backend in ("zero1", "zero2"):
        frozen = Placement.flat_chunks(shapes, rank, world).ranges
        cut = zero12({f: s for f, s in shapes.items() if f in trainable}, rank, world).ranges
        return Placement(rank, world, dict(shapes), {f: cut.get(f, frozen[f]) for f in shapes})
    if backend == "fsdp1":
        return fsdp1(shapes, units, rank, world)
    return Placement.rows(shapes, rank, world)


def _unit_groups(shapes: Shapes, units: list[str]) -> list[list[str]]:
    """FSDP1's flat parameters: one per decoder layer (``units`` are their name prefixes), then the root."""
    groups = [[f for f in shapes if f.startswith(u)] for u in units]
    return [g for g in groups if g] + [[f for f in shapes if not any(f.startswith(u) for u in units)]]


def stored_numel(backend: str, shapes: Shapes, units: list[str], world: int) -> int:
    """Elements of ``shapes`` one rank allocates for parameters (or their gradients) under ``backend``,
    padding included: FSDP2 pads every shard to ``ceil(rows / world)`` rows, ZeRO-3 to ``ceil(numel /
    world)``, FSDP1 each unit's flat parameter to a multiple of ``world``. Every rank allocates the same."""
    if backend not in SHARDS_PARAMS or world == 1:
        return sum(math.prod(s) for s in shapes.values())
    if backend == "zero3":
        return sum(math.ceil(math.prod(s) / world) for s in shapes.values())
    if backend == "fsdp2":
        return sum(math.ceil(s[0] / world) * math.prod(s[1:]) for s in shapes.values())
    return sum(math.ceil(sum(math.prod(shapes[f]) for f in g) / world) for g in _unit_groups(shapes, units) if g)
