"""LoRA helpers shared by the methods: attach an adapter, find the adapted modules, run the reference.

The DPO reference policy is the same PEFT model with its adapter switched off (TRL's default with PEFT),
so no second copy of the base model is ever held.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from fisherdist.config import Section


class LoraSettings(Section):
    """The ``lora:`` section: SUV's defaults (r 8, alpha 16, dropout 0.05 on q,k,v,o)."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


def apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA model; only the adapter factors are trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
        bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@dataclass(frozen=True)
class AdaptedModule:
    """One LoRA-adapted linear: the FQN of its frozen base weight and its two factors."""

    name: str  # module FQN, e.g. base_model.model.model.layers.0.self_attn.q_proj
    module: nn.Module

    @property
    def base_weight_fqn(self) -> str:
        return f"{self.name}.base_layer.weight"

    @property
    def lora_a(self) -> torch.Tensor:  # (r, d_in)
        return self.module.lora_A["default"].weight

    @property
    def lora_b(self) -> torch.Tensor:  # (d_out, r)
        return self.module.lora_B["default"].weight


def adapted_modules(model: nn.Module) -> list[AdaptedModule]:
    """Every LoRA layer of a PEFT model, in module order (FQNs as in ``model.named_modules()``)."""
    from peft.tuners.lora import LoraLayer

    return [AdaptedModule(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def base_weight_patterns(lora: LoraSettings) -> list[str]:
    """fnmatch patterns for the frozen base weights under the adapter (the SUV Fisher targets)."""
    return [f"*{t}.base_layer.weight" for t in lora.targets]


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Forward passes inside run the base model (reference policy), without gradients."""
    with torch.no_grad(), model.disable_adapter():
        yield
