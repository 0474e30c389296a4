"""SUV stage 3: the forbidden and retain Fisher of the frozen base q,k,v,o weights, and the barrier from them.

Both passes use the sharded engine at sample granularity (per-sample empirical Fisher, mean convention),
before training, while LoRA B = 0 so the adapted model is the base model. Each rank keeps only its fragment;
the full Fisher is never gathered. States are saved with DCP, so a later ``suv train`` may run on another
world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fisherdist.data.batches import rank_batches
from fisherdist.distributed.collectives import rank_world
from fisherdist.fisher import FisherAccumulator, FisherSpec, estimate_fisher
from fisherdist.fisher.checkpoint import load_fisher, save_fisher
from fisherdist.methods.suv.config import FisherSettings
from fisherdist.methods.suv.regularizer import FisherBarrier
from fisherdist.models.peft_utils import LoraSettings, adapted_modules, base_weight_patterns

PASSES = ("forbidden", "retain")


def fisher_spec(fs: FisherSettings, lora: LoraSettings) -> FisherSpec:
    return FisherSpec(estimator="empirical", granularity="sample", params=base_weight_patterns(lora), dtype=fs.dtype)


@contextmanager
def optimizer_untouched(wrapped: Any) -> Iterator[None]:
    """The pass runs on the training model, and under ZeRO only ``engine.step()`` clears gradients: hold the
    learning rate at 0 meanwhile, then forget the optimizer state those steps created (moments, step count),
    so training starts exactly as if no pass had run."""
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


def run_pass(wrapped: Any, tokens: list[list[int]], fs: FisherSettings, lora: LoraSettings, pad_id: int,
             progress: bool = True) -> FisherAccumulator:
    """One Fisher pass over ``tokens`` (every rank gets the same number of micro-batches)."""
    rank, world = rank_world()
    batches = rank_batches([t[: fs.max_length] for t in tokens], fs.batch_size, rank, world, pad_id)
    device = next(p for p in wrapped.unwrapped.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    with optimizer_untouched(wrapped):
        return estimate_fisher(wrapped, batches, fisher_spec(fs, lora), progress=progress, total=len(batches))


def barrier_from(wrapped: Any, accs: dict[str, FisherAccumulator], fs: FisherSettings) -> FisherBarrier:
    """D fragments from the two passes (this rank's rows only) -> the log barrier."""
    forbid, retain = accs["forbidden"], accs["retain"]
    fragments = {fqn: forbid.fragment(fqn) for fqn in forbid.targets}
    with torch.no_grad():
        f_f = {fqn: forbid.fisher(fqn).clone() for fqn in forbid.targets}
        f_r = {fqn: retain.fisher(fqn).clone() for fqn in retain.targets}
    return FisherBarrier.build(adapted_modules(wrapped.unwrapped), f_f, f_r, fragments, fs.eps1, fs.eps2, fs.chunk_rows)


def compute_and_save(wrapped: Any, forbid_tokens: list[list[int]], retain_tokens: list[list[int]], fs: FisherSettings,
                     lora: LoraSettings, pad_id: int, out: Path | None, progress: bool = True) -> FisherBarrier:
    """Both passes; saves ``out/fisher_{forbidden,retain}`` when ``out`` is given; returns the barrier."""
    accs = {}
    for name, tokens in zip(PASSES, (forbid_tokens, retain_tokens)):
        accs[name] = run_pass(wrapped, tokens, fs, lora, pad_id, progress)
        if out is not None:
            save_fisher(accs[name].state, out / f"fisher_{name}")
    barrier = barrier_from(wrapped, accs, fs)
    for acc in accs.values():
        acc.close()
    return barrier


def load_barrier(wrapped: Any, fs: FisherSettings, lora: LoraSettings, out: Path) -> FisherBarrier:
    """Re-shard saved Fisher states onto this run's layout (any world size / backend) and build the barrier."""
    accs = {}
    for name in PASSES:
        acc = FisherAccumulator(wrapped, fisher_spec(fs, lora))
        load_fisher(acc.state, out / f"fisher_{name}")
        accs[name] = acc
    barrier = barrier_from(wrapped, accs, fs)
    for acc in accs.values():
        acc.close()
    return barrier
