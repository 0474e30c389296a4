"""Selecting target parameters by name pattern, including frozen base weights of a PEFT model."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fisherdist.errors import FisherdistError


def clean_fqn(name: str) -> str:
    """Strip wrapper prefixes (FSDP1, activation checkpointing, torch.compile) from a parameter name."""
    for token in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(token, "")
    return name


def select_targets(model: nn.Module, patterns: list[str]) -> dict[str, nn.Parameter]:
    """``{fqn: param}`` for every parameter whose name matches a pattern; every pattern must match."""
    named = {clean_fqn(name): p for name, p in model.named_parameters(remove_duplicate=True)}
    chosen: dict[str, nn.Parameter] = {}
    for pattern in patterns:
        hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(list(named)[:3])
            raise FisherdistError(
                f"fisher.params: pattern {pattern!r} matches no parameter of the model (names look like: {sample}, ...)"
            )
        for n in hits:
            chosen[n] = named[n]
    return dict(sorted(chosen.items(), key=lambda kv: list(named).index(kv[0])))


def param_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The global (unsharded) shape, also for DTensor and DeepSpeed ZeRO-3 (``ds_shape``) parameters."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def tensor_hook(t: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """``t.register_hook(fn)`` with a type (torch's stub of ``register_hook`` is untyped)."""
    handle: RemovableHandle = t.register_hook(fn)  # type: ignore[no-untyped-call]
    return handle
