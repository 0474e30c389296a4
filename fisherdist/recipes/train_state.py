"""The checkpointed parts of a training run as DCP ``Stateful`` objects (FQN keys, never ranks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from fisherdist.distributed.wrap import Wrapped


class TrainableState(Stateful):
    """Trainable weights + optimizer state of a wrapped model, through its backend's own route."""

    def __init__(self, wrapped: Wrapped) -> None:
        self.w = wrapped

    def state_dict(self) -> dict[str, Any]:
        return self.w.trainable_state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.w.load_trainable_state_dict(state_dict)


class HookStates(Stateful):
    """The state of every hook that has one, under the hook's ``name``."""

    def __init__(self, hooks: Sequence[Any]) -> None:
        self.hooks: dict[str, Stateful] = {name: h for name, h in ((h.name, h) for h in hooks) if isinstance(h, Stateful)}

    def state_dict(self) -> dict[str, Any]:
        return {name: h.state_dict() for name, h in self.hooks.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, h in self.hooks.items():
            h.load_state_dict(state_dict[name])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def grad_buffer(wrapped: Wrapped, p: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like ``p``'s gradient as this rank sees it: the local shard under FSDP2, the full
    tensor where the engine owns the gradients (ZeRO-3 keeps the full shape in ``ds_shape``)."""
    if wrapped.engine_owns_grads:
        return torch.zeros(tuple(getattr(p, "ds_shape", p.shape)), dtype=torch.float32, device=p.device)
    return torch.zeros_like(_local(p))


def saved_like(wrapped: Wrapped, p: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """A :func:`grad_buffer` as checkpointed: a DTensor in ``p``'s sharding under FSDP2 (so DCP reshards
    it on another world size), else as it is."""
    if wrapped.engine_owns_grads or not hasattr(p, "device_mesh"):
        return buffer
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(buffer, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def load_buffer(buffer: torch.Tensor, saved: torch.Tensor) -> None:
    """Copy a loaded :func:`saved_like` value back into its local buffer."""
    buffer.copy_(_local(saved))
