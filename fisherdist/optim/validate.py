"""Checks that turn a bad optimizer setting into one line before any step runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from fisherdist.distributed import collectives
from fisherdist.errors import ConfigError, FisherdistError
from fisherdist.optim.subspace import side_of


def check_options(options: dict[str, Any], layerwise: bool, grad_accumulation: int,
                  max_grad_norm: float | None) -> None:
    if options["subspace"] not in ("exact", "randomized"):
        raise ConfigError(f"GaLore: subspace={options['subspace']!r}; expected 'exact' or 'randomized'")
    if int(options["oversample"]) < 0 or int(options["power_iters"]) < 0:
        raise ConfigError(f"GaLore: oversample={options['oversample']}, power_iters={options['power_iters']}; "
                          "expected integers >= 0")
    dtype = options["history_dtype"]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"GaLore: history_dtype={dtype!r}; expected a floating torch.dtype or None")
    if grad_accumulation < 1:
        raise ConfigError(f"GaLore: grad_accumulation={grad_accumulation}; expected an integer >= 1")
    if layerwise and max_grad_norm is not None:
        raise FisherdistError(f"GaLore: layerwise=True cannot honour max_grad_norm={max_grad_norm}: global-norm "
                              "clipping needs every gradient before the first parameter steps")
    if layerwise and grad_accumulation > 1:
        raise FisherdistError(f"GaLore: layerwise=True cannot honour grad_accumulation={grad_accumulation}: each "
                              "parameter steps in its gradient hook on every backward pass")


def check_group(group: dict[str, Any]) -> None:
    """galore-torch's value checks plus ours, naming the group's key and value."""
    beta1, beta2 = group["betas"]
    checks = [("lr", group["lr"] >= 0, ">= 0"), ("betas", 0 <= beta1 < 1 and 0 <= beta2 < 1, "in [0, 1)"),
              ("eps", group["eps"] >= 0, ">= 0"), ("history", int(group["history"]) >= 0, "an integer >= 0"),
              ("damping", group["damping"] > 0, "> 0")]
    if "rank" in group:
        checks += [("rank", int(group["rank"]) > 0, "an integer > 0"),
                   ("update_proj_gap", int(group.get("update_proj_gap", 200)) > 0, "an integer > 0")]
        side_of(group.get("proj_type", "std"), (2, 1))
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"GaLore param group: {key}={group[key]!r}; expected {expected}")


def resolve_owner_mode(params: Sequence[torch.Tensor], owner_sharding: bool | None,
                       layerwise: bool) -> tuple[list[int] | None, int, int]:
    """(owner rank per parameter or None, this rank, world): whole-matrix ownership for replicated
    parameters in a multi-rank run (DDP), none for FSDP2 DTensors or a single process."""
    me, world = collectives.rank_world()
    if owner_sharding is False or world == 1 or any(isinstance(p, DTensor) for p in params):
        return None, me, world
    if layerwise:
        raise FisherdistError("GaLore: layerwise=True with replicated (DDP) parameters: DDP averages gradients "
                              "after the post-accumulate-grad hooks run; use FSDP2 or one process, or layerwise=False")
    return collectives.assign_owners([p.numel() for p in params], world), me, world
