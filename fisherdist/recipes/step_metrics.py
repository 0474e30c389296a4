"""What the trainer adds to each step's metrics row without asking the method: the global gradient norm and
the tokens the training model's forward saw (for ``tokens_per_s``).

Tokens are counted by a forward pre-hook on the unwrapped model (the ``attention_mask`` sum, else the
``input_ids`` size), so every forward of the step counts, e.g. DPO's policy and reference passes or a retain
pass (a rank with only empty slots adds nothing); one tiny all-reduce per step makes the count global.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fisherdist.distributed.collectives import all_reduce_sum


class TokenCounter:
    """Counts the tokens entering ``module``'s forward between two :meth:`take` calls (this rank's)."""

    def __init__(self, module: nn.Module) -> None:
        self.device = next(module.parameters()).device
        self.count = torch.zeros((), dtype=torch.float64, device=self.device)  # no host sync per forward
        self._handle = module.register_forward_pre_hook(self._see, with_kwargs=True)

    def _see(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids", args[0] if args else None)
        if isinstance(mask, torch.Tensor):
            self.count += mask.detach().sum().to(self.count)
        elif isinstance(ids, torch.Tensor):
            self.count += ids.numel()

    def take(self, real: bool = True) -> float:
        """Collective: the step's tokens over all ranks; restarts the count. A rank whose slots are all empty
        (``real`` false) ran its forward on a stand-in record with zero weight, so its tokens do not count."""
        total = float(all_reduce_sum(self.count.reshape(1) * float(real))[0])
        self.count.zero_()
        return total

    def close(self) -> None:
        self._handle.remove()
