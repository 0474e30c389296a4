"""DeepSpeed ZeRO-1/2/3 wrapping (``zero1``/``zero2``/``zero3``) for :func:`fisherdist.distributed.wrap.wrap_model`.

``deepspeed.initialize`` with a plain torch optimizer (``zero_allow_untested_optimizer``), so no fused
CUDA/CPU Adam op has to be built; on a machine without CUDA, ``DS_ACCELERATOR=cpu`` selects DeepSpeed's CPU
accelerator, which communicates over the already-initialised gloo group. Precision follows the model:
bf16 models run DeepSpeed's bf16 mode, everything else its fp32 mode (fp16 is not supported on CPU).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from fisherdist.distributed.wrap import OptimizerFactory, Wrapped, _trainable
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


def load_partitioned(load: Any, dtype: torch.dtype, zero_config: dict[str, Any] | None = None, **options: Any) -> nn.Module:
    """Run ``load()`` (a ``from_pretrained``) with ZeRO-3 partitioning at construction (transformers'
    ``HfDeepSpeedConfig`` -> ``deepspeed.zero.Init``): no rank ever holds the whole model, and
    :func:`wrap_zero` later takes the partitioned parameters as they are."""
    import torch.distributed as dist

    deepspeed = _import_deepspeed(3)
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init runs before deepspeed.initialize: attach DeepSpeed's comm layer to our group now
    deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)

    hf_config = HfDeepSpeedConfig(engine_config(3, dtype, zero_config, **options))  # transformers holds a weakref
    model = load()
    del hf_config  # models built after this are not partitioned at construction
    return model
