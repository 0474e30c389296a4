"""Where this process sits and the few collectives every layer needs, safe without a process group.

One place for rank / world / barrier / sum and the dtype names configs use, so methods, evaluation and the
engine do not each keep their own copy (a single process behaves as rank 0 of a world of 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                  "float64": torch.float64}
"""Config spellings of the dtypes a model or statistic may have."""


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 without one."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """Processes in the default group; 1 without one."""
    return dist.get_world_size() if initialized() else 1


def rank_world() -> tuple[int, int]:
    return rank(), world_size()


def is_main() -> bool:
    """Rank 0 writes the files every rank shares."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (files written by one rank exist before another reads them); no-op alone."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks and return it; unchanged alone."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def assign_owners(work: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item when whole items are split across ranks (whole matrices for an optimizer or
    a decomposition): longest-processing-time greedy, largest first onto the least-loaded rank, ties to the
    lower rank and index, so every rank computes the same answer; within 4/3 of the best maximum load."""
    load = [0.0] * world
    owner = [0] * len(work)
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += work[i]
    return owner


def is_dtensor(t: torch.Tensor) -> bool:
    """An FSDP2 (DTensor) parameter, recognised without importing DTensor's module."""
    return hasattr(t, "to_local") and hasattr(t, "placements")


def gather_summing_grad(t: torch.Tensor) -> torch.Tensor:
    """The whole value of ``t``: an FSDP2 shard is all-gathered, and since each rank's gradient of the
    gathered copy is only its own share, backward SUMS them into the shard (``Partial``); a replicated
    tensor is returned as is."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import DTensor, Partial

    assert isinstance(t, DTensor)
    return t.full_tensor(grad_placements=[Partial()])
