"""SUV stage 3: the forbidden and retain Fisher of the frozen base q,k,v,o weights, and the barrier from them.

Both passes use the sharded engine (:mod:`fisherdist.recipes.fisher_pass`) before training, while LoRA B = 0
so the adapted model is the base model. Each rank keeps only its fragment; the full Fisher is never
gathered. States are saved with DCP, so a later ``suv train`` may run on another world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fisherdist.fisher import FisherAccumulator
from fisherdist.methods.suv.config import FisherSettings
from fisherdist.methods.suv.regularizer import FisherBarrier
from fisherdist.metrics import MetricsLogger
from fisherdist.models.peft_utils import LoraSettings, adapted_modules, base_weight_patterns
from fisherdist.recipes import fisher_pass as recipes_pass

PASSES = ["forbidden", "retain"]


def run_pass(wrapped: Any, tokens: list[list[int]], fs: FisherSettings, lora: LoraSettings, pad_id: int,
             progress: bool = True) -> FisherAccumulator:
    """One pass over ``tokens`` on the frozen base weights under the adapter."""
    return recipes_pass.run_pass(wrapped, tokens, fs, base_weight_patterns(lora), pad_id, progress)


def barrier_from(wrapped: Any, accs: dict[str, FisherAccumulator], fs: FisherSettings) -> FisherBarrier:
    """D fragments from the two passes (this rank's rows only) -> the log barrier; closes the passes."""
    forbid, retain = accs["forbidden"], accs["retain"]
    fragments = {fqn: forbid.fragment(fqn) for fqn in forbid.targets}
    with torch.no_grad():
        f_f = {fqn: forbid.fisher(fqn).clone() for fqn in forbid.targets}
        f_r = {fqn: retain.fisher(fqn).clone() for fqn in retain.targets}
    barrier = FisherBarrier.build(adapted_modules(wrapped.unwrapped), f_f, f_r, fragments, fs.eps1, fs.eps2, fs.chunk_rows)
    for acc in accs.values():
        acc.close()
    return barrier


def compute_and_save(wrapped: Any, forbid_tokens: list[list[int]], retain_tokens: list[list[int]], fs: FisherSettings,
                     lora: LoraSettings, pad_id: int, out: Path | None, progress: bool = True,
                     metrics: MetricsLogger | None = None) -> FisherBarrier:
    """Both passes; saves ``out/fisher_{forbidden,retain}`` when ``out`` is given; returns the barrier."""
    tokens = dict(zip(PASSES, (forbid_tokens, retain_tokens)))
    accs = recipes_pass.run_passes(wrapped, tokens, fs, base_weight_patterns(lora), pad_id, out, progress, metrics)
    return barrier_from(wrapped, accs, fs)


def load_barrier(wrapped: Any, fs: FisherSettings, lora: LoraSettings, out: Path) -> FisherBarrier:
    """Re-shard saved Fisher states onto this run's layout (any world size / backend) and build the barrier."""
    return barrier_from(wrapped, recipes_pass.load_passes(wrapped, PASSES, fs, base_weight_patterns(lora), out), fs)
