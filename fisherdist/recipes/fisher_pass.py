"""A Fisher pass on the live training model, before or between training steps.

The pass runs on the wrapped training model and clears each micro-batch's gradients with
:meth:`~fisherdist.distributed.wrap.Wrapped.clear_grads` (no optimizer step, ZeRO's reduced partitions
included), so weights, optimizer moments and step counters are exactly as the pass found them. Run it
between optimizer steps, not inside a gradient-accumulation window.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fisherdist.data.batches import rank_batches
from fisherdist.distributed.collectives import rank_world
from fisherdist.fisher import FisherAccumulator, estimate_fisher
from fisherdist.fisher.checkpoint import load_fisher, save_fisher
from fisherdist.metrics import MetricsLogger, fisher_scalars
from fisherdist.recipes.config import FisherPassSettings


def run_pass(wrapped: Any, tokens: list[list[int]], settings: FisherPassSettings, params: list[str], pad_id: int,
             progress: bool = True, metrics: MetricsLogger | None = None, stage: str = "fisher") -> FisherAccumulator:
    """One pass over ``tokens`` for the parameters matching ``params`` (every rank gets the same number of
    micro-batches); the caller closes the returned accumulator. With ``metrics``, the pass's trace and max
    per target group go in one row (step = micro-batches per rank) tagged ``stage``."""
    rank, world = rank_world()
    batches = rank_batches([t[: settings.max_length] for t in tokens], settings.batch_size, rank, world, pad_id)
    device = next(p for p in wrapped.unwrapped.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    acc = estimate_fisher(wrapped, batches, settings.spec(params), progress=progress, total=len(batches))
    if metrics is not None and settings.estimator != "kfac":
        metrics.log(len(batches), fisher_scalars(acc), stage)
    return acc


def pass_settings(settings: FisherPassSettings, params: list[str]) -> dict[str, Any]:
    """What a saved pass means: a later stage that loads it with any of these changed is refused (a change
    elsewhere, e.g. a new training weight, reuses the states)."""
    return {"fisher.estimator": settings.estimator, "fisher.granularity": settings.granularity,
            "fisher.max_length": settings.max_length, "fisher.dtype": settings.dtype, "fisher.params": list(params)}


def tokens_hash(tokens: list[list[int]]) -> str:
    """Short SHA-256 of the token ids a pass saw (data, tokenizer and truncation in one value)."""
    return hashlib.sha256(repr(tokens).encode()).hexdigest()[:16]


def run_passes(wrapped: Any, named_tokens: dict[str, list[list[int]]], settings: FisherPassSettings, params: list[str],
               pad_id: int, out: Path | None, progress: bool = True,
               metrics: MetricsLogger | None = None) -> dict[str, FisherAccumulator]:
    """One :func:`run_pass` per named token set (metrics stage ``fisher_<name>``), each saved to
    ``out/fisher_<name>`` (DCP) when ``out`` is given; the caller closes the accumulators."""
    accs = {}
    for name, tokens in named_tokens.items():
        accs[name] = run_pass(wrapped, tokens, settings, params, pad_id, progress, metrics, f"fisher_{name}")
        if out is not None:
            recorded = {**pass_settings(settings, params), "data.tokens_sha256": tokens_hash(tokens)}
            save_fisher(accs[name].state, out / f"fisher_{name}", recorded)
    return accs


def load_passes(wrapped: Any, names: list[str], settings: FisherPassSettings, params: list[str],
                out: Path) -> dict[str, FisherAccumulator]:
    """The states :func:`run_passes` saved, re-sharded onto this run's layout (any world size / backend),
    refused in one line when they were computed with other pass settings."""
    from fisherdist.integrity import check_settings, read_manifest

    accs = {}
    for name in names:
        path = out / f"fisher_{name}"
        saved = (read_manifest(path) or {}).get("settings") or {}
        check_settings(path, saved, pass_settings(settings, params), "rerun the fisher stage, or use another out")
        acc = FisherAccumulator(wrapped, settings.spec(params))
        load_fisher(acc.state, path)
        accs[name] = acc
    return accs
