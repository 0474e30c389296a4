"""A Fisher pass on the live training model, before or between training steps.

The pass runs on the wrapped training model and clears each micro-batch's gradients with
:meth:`~fisherdist.distributed.wrap.Wrapped.clear_grads` (no optimizer step, ZeRO's reduced partitions
included), so weights, optimizer moments and step counters are exactly as the pass found them. Run it
between optimizer steps, not inside a gradient-accumulation window.
"""

from __future__ import annotations

from typing import Any

from fisherdist.data.batches import rank_batches
from fisherdist.distributed.collectives import rank_world
from fisherdist.fisher import FisherAccumulator, estimate_fisher
from fisherdist.recipes.config import FisherPassSettings


def run_pass(wrapped: Any, tokens: list[list[int]], settings: FisherPassSettings, params: list[str], pad_id: int,
             progress: bool = True) -> FisherAccumulator:
    """One pass over ``tokens`` for the parameters matching ``params`` (every rank gets the same number of
    micro-batches); the caller closes the returned accumulator."""
    rank, world = rank_world()
    batches = rank_batches([t[: settings.max_length] for t in tokens], settings.batch_size, rank, world, pad_id)
    device = next(p for p in wrapped.unwrapped.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    return estimate_fisher(wrapped, batches, settings.spec(params), progress=progress, total=len(batches))
