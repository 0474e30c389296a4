"""The checkpointed parts of a training run as DCP ``Stateful`` objects (FQN keys, never ranks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
