"""Where one parameter's gradient lives and how its low-rank state is laid out across ranks.

A ``Layout`` hides the difference between a whole matrix (single process, or a DDP owner rank) and an
FSDP2 row shard (``DTensor`` with ``Shard(0)``): the maths in ``subspace`` and ``natural`` only ever see
local tensors plus ``reduce`` (a sum over the ranks that share the matrix), so one code path serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from fisherdist.errors import FisherdistError


def chunk_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of chunk ``index`` when ``torch.chunk`` splits ``size`` into ``parts`` (DTensor's rule)."""
    step = -(-size // parts)
    start = min(index * step, size)
    return start, min(start + step, size)


@dataclass(frozen=True)
class Layout:
    """A parameter's global shape and, when it is an FSDP2 row shard, the mesh it is spread over."""

    shape: tuple[int, ...]
    mesh: object | None = None  # DeviceMesh of a row-sharded DTensor; None for a whole local matrix

    @staticmethod
    def of(param: torch.Tensor) -> Layout:
        if not isinstance(param, DTensor):
            return Layout(tuple(param.shape))
        placements = tuple(param.placements)
        if param.device_mesh.ndim != 1 or placements[0] not in (Shard(0), Replicate()):
            raise FisherdistError(f"GaLore: parameter of shape {tuple(param.shape)} has placements {placements}; "
                                  "expected a 1-D mesh with Shard(0) (FSDP2 fully_shard) or Replicate")
        mesh = param.device_mesh if placements[0] == Shard(0) else None
        return Layout(tuple(param.shape), mesh)

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def world(self) -> tuple[int, int]:
        """(this rank's index, ranks) in the mesh; (0, 1) for a whole matrix."""
        if self.mesh is None:
            return 0, 1
        group = self.mesh.get_group()  # type: ignore[attr-defined]
        return dist.get_rank(group), dist.get_world_size(group)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place over the ranks holding pieces of this matrix (no-op for a whole one)."""
        if self.mesh is not None:
            dist.all_reduce(tensor, group=self.mesh.get_group())  # type: ignore[attr-defined]
        return tensor

    def columns(self, n: int) -> tuple[int, int]:
        """This rank's [start, end) slice of ``n`` columns, laid out as DTensor ``Shard(-1)`` would."""
        index, parts = self.world()
        return chunk_bounds(n, parts, index)

    def wrap(self, local: torch.Tensor, shape: Sequence[int], dim: int | None) -> torch.Tensor:
        """State as the checkpoint sees it: a DTensor sharded on ``dim`` (None: replicated), or ``local``."""
        if self.mesh is None:
            return local
        placements: list[Placement] = [Replicate() if dim is None else Shard(dim)]
        stride = torch.empty(tuple(shape), device="meta").stride()
        return DTensor.from_local(local, self.mesh, placements, run_check=False,  # type: ignore[arg-type]
                                  shape=torch.Size(shape), stride=stride)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank computes on (a DTensor's local shard, which in-place updates write through)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
