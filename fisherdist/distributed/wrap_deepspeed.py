"""DeepSpeed ZeRO-1/2/3 wrapping (``zero1``/``zero2``/``zero3``) for :func:`fisherdist.distributed.wrap.wrap_model`.

``deepspeed.initialize`` with a plain torch optimizer (``zero_allow_untested_optimizer``), so no fused
CUDA/CPU Adam op has to be built; on a machine without CUDA, ``DS_ACCELERATOR=cpu`` selects DeepSpeed's CPU
accelerator, which communicates over the already-initialised gloo group. Precision follows the model:
bf16 models run DeepSpeed's bf16 mode, everything else its fp32 mode (fp16 is not supported on CPU).
"""

from __future__ import annotations

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
    return deepspeed


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
