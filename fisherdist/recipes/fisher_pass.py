"""A Fisher pass on the live training model, before or between training steps.

The pass runs on the wrapped training model, so it must leave the optimizer as it found it: under ZeRO
only ``engine.step()`` clears gradients, so the learning rate is held at 0 meanwhile and the optimizer
state those steps created (moments, step count) is dropped afterwards; training then starts exactly as if
no pass had run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fisherdist.data.batches import rank_batches
from fisherdist.distributed.collectives import rank_world
from fisherdist.fisher import FisherAccumulator, estimate_fisher
from fisherdist.recipes.config import FisherPassSettings


@contextmanager
def optimizer_untouched(wrapped: Any) -> Iterator[None]:
    """Learning rate 0 inside, optimizer state cleared on exit (see the module docstring)."""
    opt = wrapped.optimizer
    if opt is None:
        yield
        return
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    try:
        yield
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        getattr(opt, "optimizer", opt).state.clear()


def run_pass(wrapped: Any, tokens: list[list[int]], settings: FisherPassSettings, params: list[str], pad_id: int,
             progress: bool = True) -> FisherAccumulator:
    """One pass over ``tokens`` for the parameters matching ``params`` (every rank gets the same number of
    micro-batches); the caller closes the returned accumulator."""
    rank, world = rank_world()
    batches = rank_batches([t[: settings.max_length] for t in tokens], settings.batch_size, rank, world, pad_id)
    device = next(p for p in wrapped.unwrapped.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    with optimizer_untouched(wrapped):
        return estimate_fisher(wrapped, batches, settings.spec(params), progress=progress, total=len(batches))
