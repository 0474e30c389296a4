"""DeepSpeed ZeRO-1/2/3 wrapping (``zero1``/``zero2``/``zero3``) for :func:`fisherdist.distributed.wrap.wrap_model`.

``deepspeed.initialize`` with a plain torch optimizer (``zero_allow_untested_optimizer``), so no fused
CUDA/CPU Adam op has to be built; on a machine without CUDA, ``DS_ACCELERATOR=cpu`` selects DeepSpeed's CPU
accelerator, which communicates over the already-initialised gloo group. Precision follows the model:
bf16 models run DeepSpeed's bf16 mode, everything else its fp32 mode (fp16 is not supported on CPU).
"""

from __future__ import annotations

import inspect
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fisherdist.distributed.wrap import OptimizerFactory, Wrapped, ZeroEngine, _trainable
from fisherdist.errors import FisherdistError


def deepspeed_config(stage: int, *, micro_batch_size: int = 1, gradient_accumulation_steps: int = 1,
                     reduce_bucket_size: int = 50_000_000, allgather_bucket_size: int = 50_000_000,
                     bf16: bool = False, world_size: int = 1) -> dict[str, Any]:
    """The ZeRO config we hand to ``deepspeed.initialize`` (``train_batch_size`` is derived from it)."""
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": reduce_bucket_size}
    if stage < 3:
        zero["allgather_bucket_size"] = allgather_bucket_size
    else:
        zero["stage3_prefetch_bucket_size"] = allgather_bucket_size
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter, however small
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def engine_config(stage: int, dtype: torch.dtype, zero_config: dict[str, Any] | None = None,
                  **options: Any) -> dict[str, Any]:
    """The DeepSpeed config of :func:`wrap_zero`: ``options`` are :func:`deepspeed_config` keywords and
    ``zero_config`` a raw DeepSpeed config merged over them (a recipe's ``deepspeed:`` section). The stage
    always comes from the backend name, and ``train_batch_size`` is re-derived after merging."""
    import torch.distributed as dist

    if dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise FisherdistError(f"dist.backend=zero{stage}: model dtype {dtype} is not supported by DeepSpeed on this path "
                              "(use float32, float64 or bfloat16)")
    if stage == 3 and dtype == torch.float64:  # zero.Init asserts on it where the CPU reports fp16 support
        raise FisherdistError("dist.backend=zero3: model dtype torch.float64 is not supported by DeepSpeed ZeRO-3 "
                              "(use float32 or bfloat16)")
    config = _merge(deepspeed_config(stage, bf16=dtype == torch.bfloat16, world_size=dist.get_world_size(), **options),
                    zero_config or {})
    config["zero_optimization"]["stage"] = stage
    config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
                                  * dist.get_world_size())
    return config


def _import_deepspeed(stage: int) -> Any:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - deepspeed is a dependency
        raise FisherdistError(f"dist.backend=zero{stage} needs deepspeed (pip install 'deepspeed>=0.19,<0.20'): {err}") from err
    skip_cpu_shm_op()
    return deepspeed


def skip_cpu_shm_op() -> None:
    """Without CUDA, keep DeepSpeed from JIT-building its CPU shared-memory all-reduce when its comm layer
    starts (``deepspeed.comm.torch.build_shm_op``): an inference fast path (gloo does the training
    collectives) compiled under a file lock in a per-machine cache, minutes on a loaded machine, and a
    build killed midway leaves a lock that blocks every later start. Call before DeepSpeed's comm starts
    (``deepspeed.initialize``, or accelerate's ``PartialState``); imports deepspeed."""
    if torch.cuda.is_available():
        return
    import deepspeed

    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict):  # DeepSpeed keeps edits to this dict
        ops["deepspeed_shm_comm"] = False


def wrap_zero(stage: int, model: nn.Module, opt: OptimizerFactory | None, *,
              zero_config: dict[str, Any] | None = None, **options: Any) -> Wrapped:
    """``deepspeed.initialize`` at ZeRO ``stage`` with :func:`engine_config`."""
    deepspeed = _import_deepspeed(stage)
    config = engine_config(stage, next(model.parameters()).dtype, zero_config, **options)
    params = _trainable(model)
    optimizer = opt(params) if opt else torch.optim.SGD(params, lr=0.0)  # lr 0: a Fisher pass never moves weights
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                dist_init_required=False)
    return Wrapped(f"zero{stage}", engine, model, ds_opt, extras={"deepspeed_config": config})


def load_partitioned(load: Callable[[], nn.Module], dtype: torch.dtype, zero_config: dict[str, Any] | None = None, **options: Any) -> nn.Module:
    """Run ``load()`` (a ``from_pretrained``) with ZeRO-3 partitioning at construction (transformers'
    ``HfDeepSpeedConfig`` -> ``deepspeed.zero.Init``): no rank ever holds the whole model, and
    :func:`wrap_zero` later takes the partitioned parameters as they are."""
    import torch.distributed as dist

    deepspeed = _import_deepspeed(3)
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    # zero.Init runs before deepspeed.initialize: attach DeepSpeed's comm layer to our group now
    deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)

    keep: Callable[[dict[str, Any]], object] = HfDeepSpeedConfig
    hf_config = keep(engine_config(3, dtype, zero_config, **options))  # transformers holds a weakref
    model = load()
    del hf_config  # models built after this are not partitioned at construction
    return model


# ---- gradients cleared without an optimizer step (a Fisher pass on a live engine) ---------------------

_clears: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # engine -> clear_zero_grads calls


def clear_zero_grads(engine: ZeroEngine) -> None:
    """Forget the gradients of every backward since the last step, as DeepSpeed's own overflow path does
    when it skips a step (``stage_1_and_2.step`` / ``stage3._overflow_clean_up``), minus the loss-scale update.

    ``engine.zero_grad()`` only drops ``param.grad``: ZeRO-1/2 keep the reduced partition in
    ``averaged_gradients`` (and ``all_grad_tensors`` between boundaries), ZeRO-3 keeps it in its partition
    buffers and adds the next backward to it unless ``micro_step_id`` is 0. No counter moves, so the
    engine's gradient-accumulation boundary bookkeeping is that of a run without the pass.
    """
    opt = engine.optimizer
    engine.zero_grad()  # every parameter of the module, frozen ones included
    opt.zero_grad(set_to_none=True)  # param.grad and grad_accum; ZeRO-3: micro_step_id = 0, epilogue flag off
    if engine.zero_optimization_stage() == 3:
        if not opt.offload_optimizer:
            opt.averaged_gradients = {}
        else:
            opt.reset_cpu_buffers()
    else:
        opt.micro_step_id = -1  # stage_1_and_2.INITIAL_MICRO_STEP_ID: the next backward starts a new step
        opt._release_preflattened_grad_buffers()
        if opt.cpu_offload:
            opt.reset_cpu_buffers()
            opt._offload_accumulated_param_ids = set()
        for group in set(opt.averaged_gradients) | set(opt.all_grad_tensors):
            opt.averaged_gradients[group] = None
            opt.all_grad_tensors[group] = None
    _clears[engine] = _clears.get(engine, 0) + 1


def grad_epoch(engine: ZeroEngine) -> tuple[int, int]:
    """Changes whenever the engine's gradients are cleared (an optimizer step or :func:`clear_zero_grads`):
    a reader of the reduced gradient uses it to refuse reading the same accumulation twice."""
    return int(engine.global_steps), _clears.get(engine, 0)

# ---- Wrapped's backend operations under ZeRO (DeepSpeed's public fragment accessors) ------------------
def full_grad(param: torch.Tensor) -> torch.Tensor:
    """The whole reduced gradient of ``param``, assembled from DeepSpeed's partitions (collective)."""
    from deepspeed.utils import safe_get_full_grad

    grad: torch.Tensor = safe_get_full_grad(param)
    return grad


def add_full_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """DeepSpeed's (partitioned, already averaged) gradient of ``param`` += ``grad`` (full size)."""
    from deepspeed.utils import safe_set_full_grad

    current = full_grad(param)
    safe_set_full_grad(param, current + grad.to(current.dtype).view_as(current))


def gather_full(named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Full CPU copies of ZeRO-3 partitioned parameters (collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().cpu().clone() for n, p in named}


def _flat_partitions(zero_opt: Any) -> list[torch.Tensor]:
    """The fp32 flat partitions DeepSpeed's inner optimizer steps (ZeRO-1/2 and ZeRO-3 name them differently)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(zero_opt, attr):
            return list(getattr(zero_opt, attr))
    raise FisherdistError(f"DeepSpeed {type(zero_opt).__name__}: no fp32 partitions found; this DeepSpeed version is "
                          "not supported for training checkpoints (tested: 0.19)")


def _ensure_optimizer_state(zero_opt: Any) -> list[torch.Tensor]:
    """Create the inner optimizer's state the way its first step would (a zero-gradient, lr-0 step on a
    same-class optimizer), so checkpoint values can be written into it before training has stepped."""
    inner = zero_opt.optimizer
    flats = _flat_partitions(zero_opt)
    accepted = inspect.signature(type(inner)).parameters  # a group also holds keys its constructor does not take
    group = inner.param_groups[0] if inner.param_groups else inner.defaults
    hyper = {k: v for k, v in group.items() if k in accepted and k not in ("params", "lr")}
    for flat in flats:
        if inner.state.get(flat):
            continue
        flat.grad = torch.zeros_like(flat)
        probe = type(inner)([flat], **{**hyper, "lr": 0.0})
        probe.step()
        inner.state[flat] = probe.state[flat]
        flat.grad = None
    link = getattr(zero_opt, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2 map fragments after step 1
    if link is not None:
        zero_opt._hp_optimizer_states_linked = False
        link()
    return flats


def _state_keys(zero_opt: Any, flats: list[torch.Tensor]) -> list[str]:
    state = zero_opt.optimizer.state[flats[0]]
    return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flats[0].shape)


def zero_state_dict(zero_opt: Any, named: list[tuple[str, nn.Parameter]]) -> dict[str, Any]:
    """Trainable fp32 weights and optimizer state as full, FQN-keyed tensors (identical on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    flats = _ensure_optimizer_state(zero_opt)
    step = zero_opt.optimizer.state[flats[0]].get("step")
    optim: dict[str, Any] = {}
    for name, p in named:
        for key in _state_keys(zero_opt, flats):
            optim[f"state.{name}.{key}"] = safe_get_full_optimizer_state(p, key).detach().clone()
        if step is not None:
            optim[f"state.{name}.step"] = torch.as_tensor(step).detach().clone()
    return {"model": {n: safe_get_full_fp32_param(p).detach().clone() for n, p in named}, "optim": optim}


def load_zero_state_dict(zero_opt: Any, named: list[tuple[str, nn.Parameter]], state: dict[str, Any]) -> None:
    """Write :func:`zero_state_dict`'s values back: the fp32 masters, the working (low-precision) weights,
    the optimizer state and its step count."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    flats = _ensure_optimizer_state(zero_opt)
    model, optim = state["model"], state.get("optim", {})
    for name, p in named:
        safe_set_full_fp32_param(p, model[name].float())
        for key in _state_keys(zero_opt, flats):
            if f"state.{name}.{key}" in optim:
                safe_set_full_optimizer_state(p, optim[f"state.{name}.{key}"].float(), key)
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0), torch.no_grad():
        for name, p in named:  # ZeRO-3: whole inside the context, re-partitioned from rank 0 on exit
            p.copy_(model[name].to(p.dtype).view_as(p))
    steps = [v for k, v in optim.items() if k.endswith(".step")]
    for flat in flats:
        if steps and "step" in zero_opt.optimizer.state[flat]:
            current = zero_opt.optimizer.state[flat]["step"]
            zero_opt.optimizer.state[flat]["step"] = torch.as_tensor(steps[0]).to(current) if torch.is_tensor(current) else int(steps[0])
