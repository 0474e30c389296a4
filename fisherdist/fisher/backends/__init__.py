"""Backend adapters, chosen from the object the user hands us (or named explicitly)."""

from __future__ import annotations

import importlib

from torch import nn

from fisherdist.errors import FisherdistError
from fisherdist.fisher.backends.base import Backend

# name -> "module:Class"; imported lazily so e.g. DeepSpeed is only imported when used.
ADAPTERS = {
    "none": "fisherdist.fisher.backends.single:SingleBackend",
    "ddp": "fisherdist.fisher.backends.ddp:DDPBackend",
    "fsdp2": "fisherdist.fisher.backends.fsdp2:FSDP2Backend",
    "fsdp1": "fisherdist.fisher.backends.fsdp1:FSDP1Backend",
    **{f"zero{s}": "fisherdist.fisher.backends.zero:ZeroBackend" for s in (1, 2, 3)},
}


def detect_backend(model: object) -> str:
    """Infer the backend name from a wrapped model (``Wrapped``, DDP, FSDP2/FSDP1 module, DeepSpeed engine)."""
    name = getattr(model, "backend", None)
    if isinstance(name, str):
        return name
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "ddp"
    if isinstance(model, FullyShardedDataParallel):
        return "fsdp1"
    if isinstance(model, FSDPModule):
        return "fsdp2"
    if type(model).__name__ == "DeepSpeedEngine":
        return f"zero{model.zero_optimization_stage()}"  # type: ignore[attr-defined]
    if isinstance(model, nn.Module):
        return "none"
    raise FisherdistError(f"cannot attach a Fisher accumulator to a {type(model).__name__}")


def make_backend(model: object, name: str | None = None) -> Backend:
    """The adapter for ``model``; a ``Wrapped`` contributes its framework object and unwrapped module."""
    name = name or detect_backend(model)
    if name not in ADAPTERS:
        raise FisherdistError(f"dist.backend: unknown backend {name!r}; expected one of {sorted(ADAPTERS)}")
    framework_obj = getattr(model, "module", model) if hasattr(model, "unwrapped") else model
    module_name, cls_name = ADAPTERS[name].split(":")
    backend: Backend = getattr(importlib.import_module(module_name), cls_name)(framework_obj)
    backend.unwrapped = getattr(model, "unwrapped", None) or _unwrap(framework_obj)
    return backend


def _unwrap(obj: object) -> nn.Module:
    inner = getattr(obj, "module", obj)
    return inner if isinstance(inner, nn.Module) else obj  # type: ignore[return-value]
