"""The estimation loop shared by ``fisherdist fisher`` and every method that needs a Fisher pass."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fisherdist.distributed.collectives import all_reduce_sum, is_main, rank, world_size
from fisherdist.errors import FisherdistError
from fisherdist.fisher.accumulator import FisherAccumulator
from fisherdist.fisher.api import Accumulator
from fisherdist.fisher.loss import model_labels, per_sample_nll
from fisherdist.fisher.spec import LABEL_SOURCE, FisherSpec


def make_accumulator(wrapped: object, spec: FisherSpec) -> Accumulator:
    """A diagonal / rank-1 accumulator, or Kronecker factors for ``estimator: kfac`` (same loop surface)."""
    if spec.estimator == "kfac":
        from fisherdist.fisher.kfac import KroneckerFactors

        return KroneckerFactors(wrapped, spec)
    return FisherAccumulator(wrapped, spec)


def _loss(nll: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, spec: FisherSpec) -> torch.Tensor:
    """The loss whose gradient each granularity squares: the sum of per-sample means (sample), the
    micro-batch's token mean (token-weighted microbatch) or its sample mean (microbatch).

    ``batch``: the framework AVERAGES gradients over ranks, so each rank's loss is its sum over valid samples
    times ``world / (valid samples on all ranks)``: the reduced gradient is the mean over the step's valid
    samples even when a rank's last micro-batch is all top-up padding (one scalar collective).
    """
    if spec.granularity == "sample":
        return nll.sum()
    if spec.granularity == "microbatch" and spec.token_weighted:
        tokens = (labels[:, 1:] != -100).sum(1).to(nll.dtype) * valid
        return (nll * tokens).sum() / tokens.sum().clamp_min(1)
    if spec.granularity == "microbatch":
        return nll.sum() / valid.sum().clamp_min(1)
    total = all_reduce_sum(valid.sum().to(torch.float64).reshape(1))
    return nll.sum() * (world_size() / total.clamp_min(1).to(nll.dtype))


def _plain_backward(loss: torch.Tensor) -> None:
    torch.autograd.backward(loss)


def _any_rank(flag: torch.Tensor) -> bool:
    """True if ``flag`` is set on any rank (one scalar collective; keeps every rank on the same path)."""
    return bool(all_reduce_sum(flag.to(torch.int32).reshape(1).clone()).item())


def fisher_step(wrapped: object, acc: Accumulator, batch: dict[str, torch.Tensor],
                generator: torch.Generator | None = None) -> None:
    """One micro-batch: forward, (sampled) labels, the granularity's loss, backward, ``acc.step()``.

    Forward and backward both run inside ``acc.record`` (per-sample and K-FAC hooks read activations).
    Samples whose loss is NaN/inf are dropped and the forward is redone without them before anything is
    recorded (they would poison every sum); they are counted in ``counts.skipped``. With ``mc_samples``
    M > 1 every draw adds its statistics and weight, but the samples are counted once (resume position).
    """
    module = getattr(wrapped, "module", wrapped)
    if not isinstance(module, nn.Module):
        raise FisherdistError(f"fisher_step: expected a model or a Wrapped model, got {type(wrapped).__name__}")
    backward: Callable[[torch.Tensor], None] = getattr(wrapped, "backward", _plain_backward)
    spec = acc.spec
    ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    valid = batch.get("valid", torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device))
    for draw in range(spec.mc_samples):
        for attempt in range(2):
            with acc.record(labels, valid=valid, count=draw == 0):
                logits = module(input_ids=ids, attention_mask=mask).logits
                used = model_labels(logits, labels, LABEL_SOURCE[spec.estimator], generator)
                nll = per_sample_nll(logits, used)
                bad = ~torch.isfinite(nll) & valid
                if attempt == 0 and _any_rank(bad.any()):
                    acc.cancel()
                    del logits, nll  # leave without a backward: nothing is recorded
                else:
                    nll = torch.where(valid, nll, torch.zeros_like(nll))  # padding samples carry no loss
                    backward(_loss(nll, used, valid, spec))
                    break
            keep = ~bad
            acc.state.count(skipped=bad.sum().to(torch.float64))
            ids, labels, valid = ids[keep], labels[keep], valid[keep]
            mask = mask[keep] if mask is not None else None
        acc.step()
        _discard_grads(wrapped, module)


def _discard_grads(wrapped: object, module: torch.nn.Module) -> None:
    """Drop this micro-batch's gradients without an optimizer step, so a pass on a live training model
    leaves its weights, optimizer state and step counters as they were (ZeRO's reduced partitions too)."""
    from fisherdist.distributed.wrap import Wrapped

    if isinstance(wrapped, Wrapped):
        wrapped.clear_grads()
    else:
        module.zero_grad(set_to_none=True)


def check_health(acc: Accumulator) -> None:
    """Fail if too many samples were skipped or a statistic is not finite (one sync, after the loop)."""
    counts = acc.state.global_counts()
    seen = counts["samples"] + counts["skipped"]
    if counts["skipped"]:
        warnings.warn(f"fisher: skipped {int(counts['skipped'])} of {int(seen)} samples with NaN/inf loss", stacklevel=2)
        if counts["skipped"] > acc.spec.max_bad_fraction * seen:
            raise FisherdistError(
                f"fisher: {int(counts['skipped'])} of {int(seen)} samples had NaN/inf loss, more than "
                f"fisher.max_bad_fraction={acc.spec.max_bad_fraction}"
            )
    for stat, per_fqn in acc.state.buffers.items():
        for fqn, buf in per_fqn.items():
            if not torch.isfinite(buf).all():
                raise FisherdistError(f"fisher: statistic {stat} of {fqn} is not finite (NaN/inf gradients)")


def estimate_fisher(wrapped: object, batches: Iterable[dict[str, torch.Tensor]], spec: FisherSpec, *,
                    progress: bool = True, total: int | None = None, acc: Accumulator | None = None) -> Accumulator:
    """Accumulate ``spec`` over ``batches`` (this rank's micro-batches) and return the accumulator."""
    from rich.progress import Progress

    acc = acc or make_accumulator(wrapped, spec)
    generator = torch.Generator().manual_seed(spec.seed + rank())
    show = progress and is_main()
    with Progress(disable=not show, transient=True) as bar:
        task = bar.add_task("fisher", total=total)
        for batch in batches:
            fisher_step(wrapped, acc, batch, generator)
            bar.advance(task)
    check_health(acc)
    return acc
