"""The ``optim:`` section of a training recipe: AdamW, GaLore or Natural GaLore (:mod:`fisherdist.optim`).

GaLore projects the gradients of 2-D weight matrices; ``targets`` (fnmatch patterns on parameter FQNs,
default: the attention and MLP projections) pick them, every other trainable tensor (embeddings, norms,
the LM head, LoRA factors) gets the optimizer's plain AdamW update, as in galore-torch's examples.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from fisherdist.config import Section

PROJECTIONS = ["*q_proj.weight", "*k_proj.weight", "*v_proj.weight", "*o_proj.weight", "*gate_proj.weight",
               "*up_proj.weight", "*down_proj.weight"]


class OptimizerSettings(Section):
    """``name: adamw`` is ``torch.optim.AdamW``; ``galore`` / ``natural_galore`` are fisherdist.optim's."""

    name: Literal["adamw", "galore", "natural_galore"] = "adamw"
    rank: int = Field(128, gt=0, description="GaLore: rank of the gradient subspace")
    update_proj_gap: int = Field(200, gt=0, description="GaLore: steps between subspace refreshes (T)")
    scale: float = Field(0.25, gt=0, description="GaLore: scale of the projected update (alpha)")
    proj_type: Literal["std", "reverse_std", "left", "right"] = "std"
    history: int = Field(4, ge=0, description="Natural GaLore: window s of projected gradients (0 = GaLore)")
    damping: float = Field(1e-3, gt=0, description="Natural GaLore: lambda of (lambda I + G G^T)")
    subspace: Literal["exact", "randomized"] = Field("exact", description="SVD (galore-torch) or randomized (GaLore 2)")
    targets: list[str] = Field(default_factory=lambda: list(PROJECTIONS), description="matrices GaLore projects")


def param_groups(settings: OptimizerSettings, named: list[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    """GaLore groups: the 2-D ``targets`` with the subspace keys, then everything else plain."""
    hit = [p for n, p in named if p.ndim == 2 and any(fnmatch.fnmatchcase(n, t) for t in settings.targets)]
    ids = {id(p) for p in hit}
    rest = [p for _, p in named if id(p) not in ids]
    keys = {"rank": settings.rank, "update_proj_gap": settings.update_proj_gap, "scale": settings.scale,
            "proj_type": settings.proj_type}
    if settings.name == "natural_galore":
        keys.update(history=settings.history, damping=settings.damping)
    return [g for g in ({"params": hit, **keys}, {"params": rest}) if g["params"]]


def optimizer_factory(settings: OptimizerSettings, lr: float, weight_decay: float,
                      model: Callable[[], nn.Module]) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """The factory the backend wrapper calls with the trainable parameters; ``model()`` is the (wrapped)
    model at that moment, which names them (FSDP2 replaces parameters by DTensors, so names are looked up
    then, not before)."""

    def build(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if settings.name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        from fisherdist.optim import GaLoreAdamW, NaturalGaLoreAdamW

        wanted = {id(p) for p in params}
        named = [(n, p) for n, p in model().named_parameters() if id(p) in wanted]
        cls = NaturalGaLoreAdamW if settings.name == "natural_galore" else GaLoreAdamW
        return cls(param_groups(settings, named), lr=lr, weight_decay=weight_decay, subspace=settings.subspace)

    return build
