"""Single process: the whole parameter is this rank's fragment, nothing to communicate."""

from __future__ import annotations

import torch
from torch import nn

from fisherdist.fisher.backends.base import Backend
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.targets import param_shape


class SingleBackend(Backend):
    name = "none"

    def placement(self, targets: dict[str, nn.Parameter]) -> Placement:
        return Placement.rows({f: param_shape(p) for f, p in targets.items()}, 0, 1)

    def reduced_grad(self, fqn: str, param: nn.Parameter) -> torch.Tensor | None:
        return None if param.grad is None else param.grad.reshape(-1)
