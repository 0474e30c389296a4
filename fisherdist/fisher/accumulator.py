"""FisherAccumulator: the public API that wraps a user's training loop.

    acc = FisherAccumulator(model_or_wrapped, FisherSpec(...))
    with acc.record(labels):          # hooks act only inside: forward and backward
        loss = loss_fn(w.module(ids))
        w.backward(loss)
    acc.step()                        # closes the micro-batch / optimizer step

The phases of one step read like kfac-pytorch's: compute local statistics (per-sample hooks or the local
gradient) -> reduce to the owner (fused into the backend's reduction, else one reduce-scatter of ours) ->
add to the sharded running sums -> normalise on read (mean convention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from fisherdist.errors import FisherdistError
from fisherdist.fisher.backends import make_backend
from fisherdist.fisher.comm import reduce_scatter_to_owners
from fisherdist.fisher.layout import Fragment
from fisherdist.fisher.spec import FisherSpec
from fisherdist.fisher.state import FisherState
from fisherdist.fisher.targets import select_targets


def label_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry a loss per sample (HF causal LMs shift labels by one; -100 is ignored)."""
    return (labels[:, 1:] != -100).sum(dim=1)


class FisherAccumulator:
    def __init__(self, model: object, spec: FisherSpec, *, backend: str | None = None) -> None:
        self.spec = spec
        self.backend = make_backend(model, backend)
        self.model: nn.Module = self.backend.model
        self.targets = select_targets(self.backend.unwrapped, spec.params)
        self.placement = self.backend.placement(self.targets)
        self.dtype = torch.float64 if spec.dtype == "float64" else torch.float32
        device = next(iter(self.targets.values())).device
        meta = {
            "estimator": spec.estimator,
            "granularity": spec.granularity,
            "token_weighted": spec.token_weighted,
            "mc_samples": spec.mc_samples,
            "convention": "sum; divide by counts.weight for the mean F = (1/N) sum_i w_i g_i^2",
            "stats": list(spec.stats),
            "dtype": spec.dtype,
            "params": list(self.targets),
            "shapes": {f: list(s) for f, s in self.placement.shapes.items()},
            **self.backend.describe(),
        }
        self.state = FisherState(
            self.placement, spec.stats, meta, dtype=self.dtype, device=device,
            replicated_counters=("weight", "steps") if spec.granularity == "batch" else (), group=self.backend.group,
        )
        self._recording = False
        self._weight: torch.Tensor | None = None
        self._counts: dict[str, torch.Tensor] = {}
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._delivered: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._persample = None
        if spec.granularity == "sample":
            self._persample = self._make_persample()
        elif spec.granularity == "microbatch" and not self.backend.fuses_local_grads:
            self._hook_param_grads()
        if spec.granularity != "batch":
            self.backend.install(self)

    # -- what the backend adapters call -------------------------------------------------------------
    @property
    def fuses_grads(self) -> bool:
        return self.spec.granularity == "microbatch"

    def recording(self) -> bool:
        return self._recording

    def local_stats(self, fqn: str, local_grad: torch.Tensor | None) -> list[torch.Tensor] | None:
        """This rank's full-shaped statistics of ``fqn`` for the current micro-batch, or None."""
        if self.spec.granularity == "sample":
            return self._pending.pop(fqn, None)
        if local_grad is None:
            return self._pending.pop(fqn, None)
        g = local_grad.to(self.dtype) * self.backend.grad_scale
        w = self._weight
        out = []
        for stat in self.spec.stats:
            out.append(w * g * g if stat == "sq" else w * g)
        return out

    def deliver(self, fqn: str, fragments: list[torch.Tensor]) -> None:
        for stat, frag in zip(self.spec.stats, fragments):
            self.state.add(stat, fqn, frag)
        self._delivered.add(fqn)

    # -- statistic sources --------------------------------------------------------------------------
    def _make_persample(self):
        from fisherdist.fisher.persample import PerSampleStats, find_targets

        modules = find_targets(self.backend.unwrapped, list(self.targets))
        want_first = "first" in self.spec.stats
        return PerSampleStats(modules, want_first=want_first, on_ready=self._on_sample_stats, dtype=self.dtype)

    def _on_sample_stats(self, fqn: str, stats: list[torch.Tensor]) -> None:
        if self.spec.stats == ("first",):
            stats = stats[1:]
        self._pending[fqn] = stats

    def _hook_param_grads(self) -> None:
        """Microbatch statistics from the incoming (local, unreduced) gradient of each target."""
        for fqn, p in self.targets.items():
            if not p.requires_grad:
                raise FisherdistError(
                    f"fisher.granularity=microbatch needs trainable targets, but {fqn} is frozen; use granularity=sample"
                )

            def hook(grad: torch.Tensor, fqn: str = fqn) -> None:
                if self._recording:
                    self._pending[fqn] = self.local_stats(fqn, grad)

            self._handles.append(p.register_hook(hook))

    # -- the loop -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def record(self, labels: torch.Tensor | None = None, *, valid: torch.Tensor | None = None,
               loss_scale: float = 1.0) -> Iterator[None]:
        """Accumulate the backward run inside this block; ``labels`` give token counts, ``valid`` masks
        padding samples (weight 0, not counted).

        At sample granularity the backpropagated loss must be ``loss_scale`` times the SUM over samples of
        each sample's mean token NLL (:func:`fisherdist.fisher.loss.per_sample_nll`); a training loop that
        backpropagates the batch mean passes ``loss_scale=1/B``.
        """
        if labels is None and (self.spec.token_weighted or self.spec.granularity == "sample"):
            raise FisherdistError("FisherAccumulator.record() needs labels for sample or token-weighted statistics")
        tokens = label_token_counts(labels).to(torch.float64) if labels is not None else None
        mask = torch.ones(labels.shape[0], dtype=torch.float64, device=labels.device) if labels is not None else None
        if valid is not None and mask is not None:
            mask = mask * valid.to(mask)
        if self.spec.granularity == "sample":
            weights = mask * tokens if self.spec.token_weighted else mask
            self._persample.set_batch(weights.to(self.dtype), grad_scale=self.backend.grad_scale / loss_scale)
            self._weight = weights.sum()
        elif self.spec.granularity == "microbatch":
            # an all-padding micro-batch (uneven data across ranks) carries no gradient and no weight
            self._weight = (tokens * mask).sum() if self.spec.token_weighted else (mask.sum() > 0).to(torch.float64)
        else:
            self._weight = torch.ones((), dtype=torch.float64)
        self._weight = self._weight.to(self.dtype)
        # counted at step(), so a record() left without a backward (NaN retry) counts nothing
        self._counts = {"samples": mask.sum(), "tokens": (tokens * mask).sum()} if tokens is not None else {}
        self._recording = True
        if self._persample is not None:
            self._persample.attach()
        try:
            yield
        finally:
            self._recording = False
            if self._persample is not None:
                self._persample.detach()

    def step(self) -> None:
        """Close the micro-batch: reduce what the backend did not, square the reduced grad for ``batch``."""
        if self.spec.granularity == "batch":
            for fqn, p in self.targets.items():
                g = self.backend.reduced_grad(fqn, p)
                if g is None:
                    raise FisherdistError(f"batch granularity: parameter {fqn} has no gradient at step()")
                g = g.to(self.dtype)
                for stat in self.spec.stats:
                    self.state.add(stat, fqn, g * g if stat == "sq" else g)
            self.state.count(weight=1.0, steps=1.0, **self._counts)
            return
        leftovers = {}
        for fqn in self.targets:
            if fqn in self._delivered:
                continue
            stats = self._pending.pop(fqn, None)
            if stats is None:  # unused on this rank: zeros keep the collective identical on every rank
                shape = self.placement.shapes[fqn]
                stats = [torch.zeros(shape, dtype=self.dtype, device=self.state.local_counts["weight"].device)
                         for _ in self.spec.stats]
            leftovers[fqn] = stats
        for fqn, frags in reduce_scatter_to_owners(leftovers, self.placement, self.backend.group).items():
            self.deliver(fqn, frags)
        self.state.count(weight=self._weight if self._weight is not None else 0.0, steps=1.0, **self._counts)
        self._counts = {}
        self._pending.clear()
        self._delivered.clear()

    # -- reading ------------------------------------------------------------------------------------
    def fragment(self, fqn: str) -> Fragment:
        return self.placement.fragment(fqn)

    def num_samples(self) -> float:
        return self.state.global_counts()["samples"]

    def fisher(self, fqn: str, *, counts: dict[str, float] | None = None) -> torch.Tensor:
        """This rank's fragment in the MEAN convention (estimator-specific, see ``FisherSpec``); pass
        ``counts`` (``state.global_counts()``) when reading many parameters to avoid a collective each."""
        n = (counts or self.state.global_counts())["weight"]
        if n <= 0:
            raise FisherdistError("no samples accumulated yet")
        b = self.state.buffers
        if self.spec.estimator == "centered":
            mean = b["first"][fqn] / n
            return (b["sq"][fqn] / n - mean * mean).clamp_min(0)
        if self.spec.estimator == "rank1":
            return b["first"][fqn] / n
        return b["sq"][fqn] / n

    def full_fisher(self, fqn: str) -> torch.Tensor:
        """Gather the whole tensor (collective; for tests and export of small models)."""
        local = self.fisher(fqn)
        shape = self.placement.shapes[fqn]
        if self.placement.world == 1:
            return local.reshape(shape)
        full = torch.zeros(torch.Size(shape).numel(), dtype=local.dtype, device=local.device)
        start, numel = self.placement.ranges[fqn][self.placement.rank]
        full[start : start + numel] = local
        dist.all_reduce(full, group=self.backend.group)
        return full.reshape(shape)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.backend.remove()
        if self._persample is not None:
            self._persample.detach()
