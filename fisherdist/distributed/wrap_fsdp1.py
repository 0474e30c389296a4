"""FSDP1 (``FullyShardedDataParallel``) wrapping for :func:`fisherdist.distributed.wrap.wrap_model`.

FULL_SHARD with ``use_orig_params=True`` (so the user's parameter objects and names survive, frozen and
trainable parameters may share a unit as in PEFT), one FSDP unit per decoder layer plus the root.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from fisherdist.distributed.wrap import OptimizerFactory, Wrapped, _trainable, _transformer_blocks


def wrap_fsdp1(model: nn.Module, opt: OptimizerFactory | None, **_: Any) -> Wrapped:
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, lambda_auto_wrap_policy

    blocks = {id(b) for b in _transformer_blocks(model)}
    policy = (functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in blocks)
              if blocks else ModuleWrapPolicy(set()))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    fsdp = FullyShardedDataParallel(model, sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True,
                                    auto_wrap_policy=policy, device_id=device)
    return Wrapped("fsdp1", fsdp, model, opt(_trainable(model)) if opt else None)
