"""The interface every backend adapter implements: where statistics live and how they are reduced.

An adapter knows its framework's gradient sharding (``placement``), installs hooks that fuse local
statistics into the framework's own reduction where possible (calling ``sink.local_stats`` and
``sink.deliver``), and exposes the reduced gradient fragment for ``batch`` granularity. Whatever it does
not deliver during backward is reduced by the accumulator with :mod:`fisherdist.fisher.comm`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from fisherdist.fisher.layout import Placement


class StatSink(Protocol):
    """What an adapter sees of the accumulator."""

    targets: dict[str, nn.Parameter]
    placement: Placement

    @property
    def fuses_grads(self) -> bool:
        """True when the statistics are formed from the local gradient the hook reduces (microbatch)."""
        ...

    def recording(self) -> bool: ...

    def local_stats(self, fqn: str, local_grad: torch.Tensor | None) -> list[torch.Tensor] | None: ...

    def deliver(self, fqn: str, fragments: list[torch.Tensor]) -> None: ...


class Backend(ABC):
    """One adapter per framework; ``name`` is the config value (``dist.backend``)."""

    name: str = ""
    #: True when the adapter itself feeds local gradients (microbatch) into its fused reduction.
    fuses_local_grads: bool = False
    #: False when autograd hooks on the target parameters never see their gradients (FSDP2 writes them).
    hooks_param_grads: bool = True
    #: The factor that turns the gradients the hooks see into gradients of the user's loss.
    grad_scale: float = 1.0

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        self.model = model
        #: the user's module, whose ``named_parameters()`` names the targets (set by ``make_backend``)
        self.unwrapped: nn.Module = model
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0

    @abstractmethod
    def placement(self, targets: dict[str, nn.Parameter]) -> Placement:
        """Which fragment of every target this rank owns (mirrors the framework's gradient sharding)."""

    def install(self, sink: StatSink) -> None:  # noqa: B027 - a no-op default, not an abstract method
        """Install reduction hooks (default: none, everything goes through the accumulator's collective)."""

    def remove(self, sink: StatSink) -> None:  # noqa: B027 - a no-op default, not an abstract method
        """Undo :meth:`install` for ``sink`` only (other accumulators on the same model keep their part)."""

    def stats_placement(self, targets: dict[str, nn.Parameter]) -> Placement:
        """Where sample / micro-batch statistics live; the gradient's placement unless the adapter can
        balance them better (they are formed locally, so any layout costs the same collective)."""
        return self.placement(targets)

    @abstractmethod
    def reduced_grad(self, fqn: str, param: nn.Parameter) -> torch.Tensor | None:
        """This rank's fragment (flat) of the reduced gradient at an optimizer step, or None."""

    def describe(self) -> dict[str, object]:
        """Scale semantics recorded in the saved metadata (principle 7)."""
        return {"backend": self.name, "world_size": self.world, "grad_scale": self.grad_scale}
