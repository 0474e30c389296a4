"""One short function per backend that wraps a model for training (torchtitan's ``parallelize`` idea).

No method file imports ``fully_shard`` or ``deepspeed``: recipes call :func:`wrap_model` and get a
:class:`Wrapped` with the same ``module`` / ``backward`` / ``step`` surface on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.distributed.tensor import DTensor, distribute_tensor

from fisherdist.errors import FisherdistError

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class ZeroEngine(Protocol):
    """The part of a DeepSpeed engine we use (deepspeed ships no type information)."""

    optimizer: Any  # DeepSpeed's ZeRO optimizer around the user's torch optimizer
    lr_scheduler: Any
    global_steps: int
    global_samples: int
    micro_steps: int
    skipped_steps: int

    def backward(self, loss: torch.Tensor) -> torch.Tensor: ...
    def step(self) -> None: ...
    def zero_grad(self) -> None: ...
    def zero_optimization_stage(self) -> int: ...
    def is_gradient_accumulation_boundary(self) -> bool: ...
    def gradient_accumulation_steps(self) -> int: ...
    def gradient_clipping(self) -> float: ...
    def get_global_grad_norm(self) -> float | None: ...


@dataclass
class Wrapped:
    """A model prepared for one backend; ``unwrapped`` keeps the user's parameter names."""

    backend: str
    module: nn.Module  # what to call for forward: plain module, DDP, FSDP module, DeepSpeed engine
    unwrapped: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def engine(self) -> ZeroEngine:
        """The DeepSpeed engine (``zero1/2/3`` only): ``module`` typed as what it is."""
        if not self.backend.startswith("zero"):
            raise FisherdistError(f"dist.backend={self.backend}: no DeepSpeed engine (only zero1, zero2, zero3)")
        return cast(ZeroEngine, self.module)

    def backward(self, loss: torch.Tensor) -> None:
        if self.backend.startswith("zero"):
            self.engine.backward(loss)
        else:
            torch.autograd.backward(loss)

    def step(self) -> None:
        if self.backend.startswith("zero"):
            self.engine.step()
            return
        if self.optimizer is not None:
            self.optimizer.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        if self.backend.startswith("zero"):
            self.engine.zero_grad()
        elif self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for p in self.unwrapped.parameters():
                p.grad = None

    # ---- Fisher passes on a live run: gradients cleared with no optimizer step --------------------

    def clear_grads(self) -> None:
        """Drop every gradient of the backward passes since the last step, with no optimizer step.

        A Fisher pass on a training model calls this after each micro-batch: weights, optimizer moments
        and every step counter (optimizer ``step``, DeepSpeed ``global_steps`` / ``micro_steps``, the LR
        scheduler) stay bitwise unchanged, and the next training backward starts from zero. Under ZeRO
        ``engine.zero_grad()`` is not enough (DeepSpeed keeps its reduced gradient partitions until
        ``engine.step()``), see :func:`fisherdist.distributed.wrap_deepspeed.clear_zero_grads`.
        """
        if self.backend.startswith("zero"):
            from fisherdist.distributed.wrap_deepspeed import clear_zero_grads

            clear_zero_grads(self.engine)
        else:  # DDP / FSDP1 / FSDP2 keep nothing beyond param.grad once backward has returned
            self.module.zero_grad(set_to_none=True)

    # ---- backend operations a training method needs (no backend-name checks in methods) ------------
    @property
    def engine_owns_grads(self) -> bool:
        """DeepSpeed keeps reduced gradients in its own buffers, not in ``param.grad``."""
        return self.backend.startswith("zero")

    @property
    def params_gathered_in_forward(self) -> bool:
        """ZeRO-3: full parameters exist only inside the forward, so extra terms go in as gradients."""
        return self.backend == "zero3"

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters under their unwrapped (FQN) names."""
        return [(n, p) for n, p in self.unwrapped.named_parameters() if p.requires_grad]

    def clip_grad_norm(self, max_norm: float | None) -> float | None:
        """Clip the global gradient norm (``None``: only measure it); returns the norm before clipping. ZeRO
        clips inside ``engine.step`` with its config's ``gradient_clipping``, which must then say the same (a
        silent mismatch would train differently); its norm is known after the step (:meth:`engine_grad_norm`)."""
        if self.backend == "fsdp1":  # flat-parameter shards: FSDP's own clip reduces the norm over ranks
            return float(cast(Any, self.module).clip_grad_norm_(max_norm or math.inf))
        if not self.engine_owns_grads:
            params = [p for _, p in self.named_trainable()]
            norm = (torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm is not None else
                    torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        configured = float(self.engine.gradient_clipping() or 0.0)
        if max_norm is not None and configured != max_norm:
            raise FisherdistError(f"max_grad_norm={max_norm} but the DeepSpeed config has gradient_clipping={configured}; "
                                  "set deepspeed.gradient_clipping to the same value")
        return None

    def engine_grad_norm(self) -> float | None:
        """ZeRO: the global gradient norm DeepSpeed computed in the last ``step`` (None elsewhere)."""
        norm = self.engine.get_global_grad_norm() if self.engine_owns_grads else None
        return None if norm is None else float(norm)

    def add_full_grad(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Add a full-size ``grad`` to ``param``'s reduced gradient (after ``backward``, before ``step``):
        the path for terms computed outside the forward, e.g. under ZeRO-3."""
        if self.engine_owns_grads:
            from fisherdist.distributed.wrap_deepspeed import add_full_grad

            add_full_grad(param, grad)
            return
        local = grad.to(param.dtype).view(param.shape)
        if isinstance(param, DTensor):
            # every rank holds the same full value: cut its own shard, no communication
            local = distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None).to_local()
            current = param.grad.to_local() if isinstance(param.grad, DTensor) else None
        else:
            current = param.grad
        if current is None:
            param.grad = DTensor.from_local(local, param.device_mesh, param.placements) if isinstance(param, DTensor) else local.clone()
        else:
            current.add_(local)

    def gather_trainable(self) -> dict[str, torch.Tensor]:
        """Full CPU copies of every trainable tensor, keyed by its unwrapped name (collective on all ranks)."""
        if self.params_gathered_in_forward:
            from fisherdist.distributed.wrap_deepspeed import gather_full

            return gather_full(self.named_trainable())
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone() for n, p in self.named_trainable()}

    def trainable_state_dict(self) -> dict[str, Any]:
        """``{"model": {fqn: tensor}, "optim": {"state.<fqn>.<key>": tensor}}`` of the trainable parameters
        only (frozen weights come back from the model directory): DTensor shards under FSDP2, full
        replicated tensors under ZeRO (LoRA-sized), the same names on every backend, so a checkpoint
        written under one backend and world size loads under another."""
        if self.engine_owns_grads:
            from fisherdist.distributed.wrap_deepspeed import zero_state_dict

            return zero_state_dict(self.engine.optimizer, self.named_trainable())
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.unwrapped, self._optimizers(), options=_TRAINABLE)
        return {"model": model_sd, "optim": {k: v for k, v in optim_sd.items() if k.startswith("state.")}}

    def load_trainable_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`trainable_state_dict` (optimizer state is created first if no step ran yet)."""
        if self.engine_owns_grads:
            from fisherdist.distributed.wrap_deepspeed import load_zero_state_dict

            load_zero_state_dict(self.engine.optimizer, self.named_trainable(), state)
            return
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        _, optim_sd = get_state_dict(self.unwrapped, self._optimizers(), options=_TRAINABLE)  # keeps param_groups
        optim_sd.update(state.get("optim", {}))
        set_state_dict(self.unwrapped, self._optimizers(), model_state_dict=state["model"], optim_state_dict=optim_sd,
                       options=_TRAINABLE)

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] if self.optimizer is not None else []


_TRAINABLE = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Decoder layers of an HF causal LM (``model.model.layers``), also inside a PEFT wrapper."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return list(module)
    return []


def _wrap_none(model: nn.Module, opt: OptimizerFactory | None, **_: Any) -> Wrapped:
    return Wrapped("none", model, model, opt(_trainable(model)) if opt else None)


def _wrap_ddp(model: nn.Module, opt: OptimizerFactory | None, **_: Any) -> Wrapped:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    return Wrapped("ddp", ddp, model, opt(_trainable(model)) if opt else None)


def _wrap_fsdp2(model: nn.Module, opt: OptimizerFactory | None, **_: Any) -> Wrapped:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for block in _transformer_blocks(model):  # one FSDP unit per decoder layer, then the root
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return Wrapped("fsdp2", model, model, opt(_trainable(model)) if opt else None)


WRAPPERS: dict[str, Callable[..., Wrapped]] = {"none": _wrap_none, "ddp": _wrap_ddp, "fsdp2": _wrap_fsdp2}


def _lazy(module: str, name: str, *bound: Any) -> Callable[..., Wrapped]:
    """A wrapper living in its own module (FSDP1, DeepSpeed), imported only when that backend is used."""

    def wrap(model: nn.Module, opt: OptimizerFactory | None, **options: Any) -> Wrapped:
        import importlib

        wrapper: Callable[..., Wrapped] = getattr(importlib.import_module(module), name)
        return wrapper(*bound, model, opt, **options)

    return wrap


WRAPPERS["fsdp1"] = _lazy("fisherdist.distributed.wrap_fsdp1", "wrap_fsdp1")
WRAPPERS.update({f"zero{s}": _lazy("fisherdist.distributed.wrap_deepspeed", "wrap_zero", s) for s in (1, 2, 3)})


def wrap_model(
    model: nn.Module, backend: str, optimizer_factory: OptimizerFactory | None = None, **options: Any
) -> Wrapped:
    """Wrap ``model`` for ``backend`` (``none, ddp, fsdp1, fsdp2, zero1, zero2, zero3``)."""
    if backend not in WRAPPERS:
        raise FisherdistError(f"dist.backend: unknown backend {backend!r}; expected one of {sorted(WRAPPERS)}")
    if backend != "none" and not dist.is_initialized():
        raise FisherdistError(f"dist.backend={backend} needs torch.distributed; launch with torchrun or set dist.nproc")
    return WRAPPERS[backend](model, optimizer_factory, **options)
