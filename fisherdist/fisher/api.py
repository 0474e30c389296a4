"""The loop surface every accumulator offers (diagonal ``FisherAccumulator`` and ``KroneckerFactors``), so
the estimation loop and the methods are typed against one Protocol instead of a concrete class."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import torch

from fisherdist.fisher.backends.base import Backend
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.spec import FisherSpec
from fisherdist.fisher.state import FisherState

DEFAULT_STATE = "default"


class Accumulator(Protocol):
    """``record(labels)`` around forward + backward, ``step()`` after it, ``state`` for counts and DCP."""

    spec: FisherSpec
    backend: Backend
    placement: Placement

    @property
    def state(self) -> FisherState:
        """The default state (FisherAccumulator allocates it on first use)."""
        ...

    def record(self, labels: torch.Tensor | None = None, *, valid: torch.Tensor | None = None,
               loss_scale: float = 1.0, state: str = DEFAULT_STATE,
               count: bool = True) -> AbstractContextManager[None]: ...

    def cancel(self) -> None:
        """The current ``record()`` block ran no backward: it counts nothing."""
        ...

    def step(self, *, optimizer_step: bool = True) -> None: ...

    def fisher(self, fqn: str, *, counts: dict[str, float] | None = None, state: str = DEFAULT_STATE) -> torch.Tensor: ...

    def close(self) -> None: ...
