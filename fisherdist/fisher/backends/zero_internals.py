"""The DeepSpeed internals the zero adapter relies on, in one version-guarded place.

DeepSpeed has no reduction hook and no public accessor for the ZeRO-1/2 gradient partition, so this
module reads ``param._hp_mapping`` (``tensor_fragment``: ``lp_fragment_address``, ``get_lp_grad_fragment``)
and ``param._index_in_param_group``, and checks ZeRO-3's ``ds_tensor.ds_numel`` against the flat-chunk
layout we assume. It also holds :func:`at_backward_end`, torch's private end-of-backward callback queue.
:func:`check` fails with a message naming the DeepSpeed version outside the tested
range; ``tests/test_contracts.py`` asserts each name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from fisherdist.errors import FisherdistError

SUPPORTED = ((0, 19), (0, 20))  # [lower, upper) DeepSpeed minor versions whose internals are tested
FRAGMENT_ATTRS = ("lp_fragment_address", "get_lp_grad_fragment", "param_group_index", "gradient_dict")


def version() -> tuple[int, int]:
    import deepspeed

    major, minor = deepspeed.__version__.split(".")[:2]
    return int(major), int(minor)


def check(engine: object) -> None:
    """Raise if this DeepSpeed is outside the tested range or the engine is not a ZeRO engine."""
    import deepspeed

    if not SUPPORTED[0] <= version() < SUPPORTED[1]:
        raise FisherdistError(
            f"zero backend: deepspeed {deepspeed.__version__} is not supported (its private gradient-partition "
            f"internals are tested on >={SUPPORTED[0][0]}.{SUPPORTED[0][1]},<{SUPPORTED[1][0]}.{SUPPORTED[1][1]})"
        )
    stage = engine.zero_optimization_stage()  # type: ignore[attr-defined]
    if stage not in (1, 2, 3):
        raise FisherdistError(f"zero backend: the DeepSpeed engine runs ZeRO stage {stage}; expected 1, 2 or 3")


def dp_group(engine: object) -> dist.ProcessGroup | None:
    """The data-parallel group ZeRO partitions over (gradients and our statistics share it)."""
    group: dist.ProcessGroup | None = engine.optimizer.dp_process_group  # type: ignore[attr-defined]
    return group


def fragment_address(p: nn.Parameter) -> tuple[int, int] | None:
    """ZeRO-1/2: this rank's ``(start, numel)`` of ``p.view(-1)``, or None if it owns none of ``p``."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    addr = mapping.lp_fragment_address
    return int(addr.start), int(addr.numel)


def lp_grad_fragment(p: nn.Parameter) -> torch.Tensor | None:
    """ZeRO-1/2: this rank's fragment of the boundary-reduced gradient (flat), between backward and step."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    frag: torch.Tensor = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)  # type: ignore[attr-defined]
    start, numel = int(mapping.lp_fragment_address.start), int(mapping.lp_fragment_address.numel)
    if frag.numel() == p.numel() != numel:  # bf16 optimizer keeps a whole-parameter buffer (cf. get_full_hp_grad)
        frag = frag.narrow(0, start, numel)
    return frag


def check_zero3_chunks(fqn: str, p: nn.Parameter, world: int) -> None:
    """ZeRO-3 must partition ``p`` into ``ceil(numel/world)`` flat chunks (what ``Placement.flat_chunks`` assumes)."""
    want = math.ceil(p.ds_numel / world)  # type: ignore[attr-defined]
    got = p.ds_tensor.ds_numel  # type: ignore[attr-defined]
    if got != want:
        raise FisherdistError(f"zero3 backend: {fqn} is partitioned into {got}-element chunks, expected {want}")


def at_backward_end(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the running backward pass has finished (autograd's engine callback queue, the hook
    DDP and FSDP use for the same purpose; not a DeepSpeed internal, but private to torch)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)
