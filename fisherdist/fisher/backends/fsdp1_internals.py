"""The FSDP1 private internals the fsdp1 adapter relies on, in one version-guarded place.

FSDP1 has no public way to know which FlatParameter a comm-hook call belongs to, nor where an original
parameter sits inside it. Everything private is read here; :func:`check` fails with a clear message on a
torch whose FSDP1 lacks them, and ``tests/test_contracts.py`` asserts each name for the pinned range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp._flat_param import FlatParameter

from fisherdist.errors import FisherdistError

#: (FlatParameter attribute, what we need it for)
FLAT_PARAM_ATTRS = ("_params", "_fqns", "_shapes", "_numels_with_padding", "_is_padding_mask",
                    "_shard_param_infos")
UNIT_ATTRS = ("_handle", "_comm_hook", "_comm_hook_state", "process_group", "world_size", "_use_orig_params")
TESTED = ((2, 6), (2, 13))  # torch versions whose FSDP1 internals tests/test_contracts.py covered


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def check(unit: nn.Module) -> None:
    """Raise a :class:`FisherdistError` naming the torch version if FSDP1's internals are not as expected."""
    handle = getattr(unit, "_handle", None)
    missing = [a for a in UNIT_ATTRS if not hasattr(unit, a)]
    if handle is not None:
        missing += [f"FlatParameter.{a}" for a in FLAT_PARAM_ATTRS if not hasattr(handle.flat_param, a)]
    if missing:
        raise FisherdistError(
            f"fsdp1 backend: torch {torch.__version__} lacks FSDP1 internals {missing} "
            f"(tested on torch {TESTED[0][0]}.{TESTED[0][1]}-{TESTED[1][0]}.{TESTED[1][1]}); use dist.backend=fsdp2"
        )


@dataclass
class FlatLayout:
    """Where each original parameter of one FlatParameter sits in its unsharded flat tensor."""

    params: list[nn.Parameter]
    shapes: list[tuple[int, ...]]
    numels: list[int]
    offsets: list[int]
    padded_numel: int
    shard_infos: list[object]

    def ranges(self, i: int, world: int) -> list[tuple[int, int]]:
        """Param ``i``'s ``(start, numel)`` in its flattened self on every rank (FSDP's equal flat chunks)."""
        chunk = self.padded_numel // world
        lo, hi = self.offsets[i], self.offsets[i] + self.numels[i]
        out = []
        for r in range(world):
            a, b = max(lo, r * chunk), min(hi, (r + 1) * chunk)
            out.append((a - lo, b - a) if b > a else (0, 0))
        return out

    def local_range(self, i: int) -> tuple[int, int]:
        """The same from FSDP's own ``_shard_param_infos`` (this rank only)."""
        info = self.shard_infos[i]
        if not info.in_shard:  # type: ignore[attr-defined]
            return (0, 0)
        return (info.intra_param_start_idx, info.numel_in_shard)  # type: ignore[attr-defined]


def units(model: nn.Module) -> list[FullyShardedDataParallel]:
    """Every FSDP1 unit that owns a FlatParameter (root included), checked against the guarded names."""
    if not isinstance(model, FullyShardedDataParallel):
        raise FisherdistError(f"fsdp1 backend: expected a FullyShardedDataParallel root, got {type(model).__name__}")
    out: list[FullyShardedDataParallel] = []
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            check(module)
            if module._handle is not None:
                out.append(module)
    if not getattr(model, "_use_orig_params", False):
        raise FisherdistError("fsdp1 backend: wrap with use_orig_params=True (parameter names and PEFT mixing need it)")
    return out


def flat_layout(unit: FullyShardedDataParallel) -> FlatLayout:
    assert unit._handle is not None
    flat: FlatParameter = unit._handle.flat_param
    offsets, numels, pos = [], [], 0
    for n, is_pad in zip(flat._numels_with_padding, flat._is_padding_mask):
        if not is_pad:
            offsets.append(pos)
            numels.append(n)
        pos += n
    shapes = [tuple(s) for s in flat._shapes]
    assert [math.prod(s) for s in shapes] == numels, "FSDP1 FlatParameter layout changed"
    world: int = unit.world_size
    padded = math.ceil(pos / world) * world  # FSDP shards with torch.chunk: equal ceil(total/world) chunks
    return FlatLayout(list(flat._params or []), shapes, numels, offsets, padded, list(flat._shard_param_infos))


def process_group(unit: FullyShardedDataParallel) -> dist.ProcessGroup:
    group = unit.process_group
    assert group is not None, "an FSDP1 unit always has a process group"
    return group


def unit_hook_state(unit: FullyShardedDataParallel) -> object:
    """The state of the hook installed on ``unit`` by :func:`set_unit_hook` (None without one)."""
    return unit._comm_hook_state


def set_unit_hook(unit: FullyShardedDataParallel, hook: Callable[..., None], state: object) -> None:
    """Install a comm hook on ONE unit (the public ``register_comm_hook`` sets the same hook and state on
    every unit of the tree, so it cannot tell FlatParameters apart)."""
    if unit._comm_hook is not None:
        raise FisherdistError("fsdp1 backend: this FSDP unit already has a communication hook; only one is supported")
    unit._comm_hook, unit._comm_hook_state = hook, state


def clear_unit_hook(unit: FullyShardedDataParallel) -> None:
    unit._comm_hook, unit._comm_hook_state = None, None
