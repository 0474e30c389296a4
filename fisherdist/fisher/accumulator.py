"""FisherAccumulator: the public API that wraps a user's training loop.

    acc = FisherAccumulator(model_or_wrapped, FisherSpec(...))
    with acc.record(labels):          # hooks act only inside: forward and backward
        loss = loss_fn(w.module(ids))
        w.backward(loss)
    acc.step()                        # closes the micro-batch / optimizer step

The phases of one step read like kfac-pytorch's: compute local statistics (per-sample hooks or the local
gradient) -> reduce to the owner (fused into the backend's reduction, else one reduce-scatter of ours) ->
add to the sharded running sums -> normalise on read (mean convention). One accumulator may keep several
named states (``record(labels, state="forget")``); each has its own sums and counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fisherdist.distributed.collectives import DTYPES
from fisherdist.errors import FisherdistError
from fisherdist.fisher.api import DEFAULT_STATE
from fisherdist.fisher.backends import make_backend
from fisherdist.fisher.comm import reduce_scatter_to_owners
from fisherdist.fisher.layout import Fragment
from fisherdist.fisher.persample import OnReady, PerSampleStats, find_targets
from fisherdist.fisher.spec import FisherSpec
from fisherdist.fisher.state import FisherState
from fisherdist.fisher.summary import summarise
from fisherdist.fisher.targets import select_targets, tensor_hook


def label_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry a loss per sample (HF causal LMs shift labels by one; -100 is ignored)."""
    return (labels[:, 1:] != -100).sum(dim=1)


class FisherAccumulator:
    def __init__(self, model: object, spec: FisherSpec, *, backend: str | None = None) -> None:
        self.spec = spec
        self.backend = make_backend(model, backend)
        self.model: nn.Module = self.backend.model
        self.targets = select_targets(self.backend.unwrapped, spec.params)
        self.frozen = {f for f, p in self.targets.items() if not p.requires_grad}
        if spec.granularity == "batch" and self.frozen:
            raise FisherdistError(f"fisher.granularity=batch squares the reduced gradient, but target {min(self.frozen)} "
                                  "is frozen (it has none); use granularity sample or microbatch")
        batch = spec.granularity == "batch"
        self.placement = self.backend.placement(self.targets) if batch else self.backend.stats_placement(self.targets)
        self.dtype = DTYPES[spec.dtype]
        self._device = next(iter(self.targets.values())).device
        self.states: dict[str, FisherState] = {}  # created on first use: one that only records named
        self._active_name = DEFAULT_STATE         # states never allocates the default one
        self._recording = False
        self._weight = torch.zeros((), dtype=self.dtype, device=self._device)
        self._counts: dict[str, torch.Tensor] = {}  # the open record() block's
        self._step_counts: dict[str, torch.Tensor] = {}  # every finished record() block since the last step()
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._delivered: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._persample: PerSampleStats | None = None
        self._sample_weights: torch.Tensor | None = None  # the open sample-granularity block's (see rescale)
        if spec.granularity == "sample":
            self._persample = self._make_persample(list(self.targets), self._on_sample_stats)
        elif spec.granularity == "microbatch":
            # no autograd gradient (frozen, or a backend whose gradients bypass the parameters' hooks): the
            # micro-batch's gradient is the sum of the per-sample ones
            blind = self.frozen if self.backend.fuses_local_grads or self.backend.hooks_param_grads else set(self.targets)
            if blind:
                self._persample = self._make_persample(sorted(blind), self._on_frozen_grad)
            if not self.backend.fuses_local_grads and len(blind) < len(self.targets):
                self._hook_param_grads()
        if not batch:
            self.backend.install(self)

    @property
    def state(self) -> FisherState:
        """The default state (allocated on first use)."""
        return self._state(DEFAULT_STATE)

    @property
    def _active(self) -> FisherState:
        return self._state(self._active_name)

    def _read(self, name: str) -> FisherState:
        """A state to read: the default one always exists (zeros until recorded), a named one once recorded."""
        return self.state if name == DEFAULT_STATE else self.states[name]

    def _state(self, name: str) -> FisherState:
        """The named state, created on first use (no collective: every rank creates the same)."""
        if name not in self.states:
            self.states[name] = FisherState(
                self.placement, self.spec.stats, self._meta(name), dtype=self.dtype, device=self._device,
                replicated_counters=("weight", "steps") if self.spec.granularity == "batch" else (),
                group=self.backend.group,
            )
        return self.states[name]

    def _meta(self, name: str) -> dict[str, Any]:
        spec = self.spec
        return {
            "estimator": spec.estimator, "granularity": spec.granularity, "token_weighted": spec.token_weighted,
            "mc_samples": spec.mc_samples, "decay": spec.decay, "state": name, "stats": list(spec.stats),
            "convention": "sum; divide by counts.weight for the mean F = (1/N) sum_i w_i g_i^2",
            "dtype": spec.dtype, "params": list(self.targets),
            "shapes": {f: list(s) for f, s in self.placement.shapes.items()}, **self.backend.describe(),
        }

    # -- what the backend adapters call -------------------------------------------------------------
    @property
    def fuses_grads(self) -> bool:
        return self.spec.granularity == "microbatch"

    def recording(self) -> bool:
        return self._recording

    def local_stats(self, fqn: str, local_grad: torch.Tensor | None) -> list[torch.Tensor] | None:
        """This rank's full-shaped statistics of ``fqn`` for the current micro-batch, or None."""
        if self.spec.granularity == "sample" or local_grad is None or fqn in self.frozen:
            return self._pending.pop(fqn, None)
        return self._square(local_grad)

    def _square(self, local_grad: torch.Tensor) -> list[torch.Tensor]:
        g = local_grad.to(self.dtype) * self.backend.grad_scale
        return [self._weight * g * g if stat == "sq" else self._weight * g for stat in self.spec.stats]

    def deliver(self, fqn: str, fragments: list[torch.Tensor]) -> None:
        for stat, frag in zip(self.spec.stats, fragments):
            self._active.add(stat, fqn, frag)
        self._delivered.add(fqn)

    # -- statistic sources --------------------------------------------------------------------------
    def _make_persample(self, fqns: list[str], on_ready: OnReady) -> PerSampleStats:
        modules = find_targets(self.backend.unwrapped, fqns)
        want_first = "first" in self.spec.stats or self.spec.granularity == "microbatch"
        return PerSampleStats(modules, want_first=want_first, on_ready=on_ready, dtype=self.dtype)

    def _keep(self, fqn: str, stats: list[torch.Tensor]) -> None:
        """Local statistics wait for the backend's reduction; on one rank there is none (FSDP2 skips its
        reduce-scatter hook there), so they go straight into the sums instead of piling up until step()."""
        if self.placement.world == 1:
            self.deliver(fqn, stats)
        else:
            self._pending[fqn] = stats

    def _on_sample_stats(self, fqn: str, stats: list[torch.Tensor]) -> None:
        self._keep(fqn, stats[1:] if self.spec.stats == ("first",) else stats)

    def _on_frozen_grad(self, fqn: str, stats: list[torch.Tensor]) -> None:
        """Micro-batch granularity, a target no gradient hook sees: ``first`` (unit weights) is its gradient."""
        self._keep(fqn, self._square(stats[1]))

    def _hook_param_grads(self) -> None:
        """Microbatch statistics from the incoming (local, unreduced) gradient of each trainable target."""
        for fqn, p in self.targets.items():
            if fqn in self.frozen:
                continue

            def hook(grad: torch.Tensor, fqn: str = fqn) -> None:
                if self._recording:
                    self._keep(fqn, self._square(grad))

            self._handles.append(tensor_hook(p, hook))

    # -- the loop -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def record(self, labels: torch.Tensor | None = None, *, valid: torch.Tensor | None = None,
               loss_scale: float = 1.0, state: str = DEFAULT_STATE, count: bool = True) -> Iterator[None]:
        """Accumulate the backward run inside this block into the named ``state``; ``labels`` give token
        counts, ``valid`` masks padding samples (weight 0, not counted); ``count=False`` adds the weight but
        not the samples (a further Monte-Carlo draw of samples already counted).

        At sample granularity the backpropagated loss must be ``loss_scale`` times the SUM over samples of
        each sample's mean token NLL (:func:`fisherdist.fisher.loss.per_sample_nll`); a training loop that
        backpropagates the batch mean passes ``loss_scale=1/B``. Several blocks before one ``step()``
        (gradient accumulation) count every block's samples and tokens.
        """
        self._open(state)
        self._weight, self._counts = self._weigh(labels, valid, loss_scale, count)
        self._recording = True
        if self._persample is not None:
            self._persample.attach()
        try:
            yield
        finally:
            self._recording = False
            if self._persample is not None:
                self._persample.detach()
            for name, value in self._counts.items():  # cancel() empties them when no backward ran
                self._step_counts[name] = self._step_counts.get(name, 0.0) + value
            self._counts = {}

    def _open(self, name: str) -> None:
        """Select the state of this block; an online Fisher decays it once per optimizer step, before the
        step's first statistics arrive (they are delivered during backward)."""
        if self._step_counts and name != self._active_name:
            raise FisherdistError(f"FisherAccumulator.record(state={name!r}) inside an optimizer step that records "
                                  f"into another state; call acc.step() first")
        self._active_name = name
        if self._active.decay_due and self.spec.decay is not None:
            self._active.decay(self.spec.decay)
        self._active.decay_due = False

    def _weigh(self, labels: torch.Tensor | None, valid: torch.Tensor | None, loss_scale: float,
               count: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The block's weight (sample: sum of per-sample weights, set on the hooks; microbatch: its tokens or
        1; batch: counted at step()) and the counts it adds if it runs a backward."""
        if labels is None:
            if self.spec.token_weighted or self.spec.granularity == "sample":
                raise FisherdistError("FisherAccumulator.record() needs labels for sample or token-weighted statistics")
            weight = torch.ones((), dtype=self.dtype, device=self._device)
            return weight, ({"weight": weight.double()} if self.spec.granularity == "microbatch" else {})
        tokens = label_token_counts(labels).to(torch.float64)
        mask = torch.ones(labels.shape[0], dtype=torch.float64, device=labels.device)
        if valid is not None:
            mask = mask * valid.to(mask)
        if self.spec.granularity == "sample":
            weights = mask * tokens if self.spec.token_weighted else mask
            assert self._persample is not None
            self._sample_weights = weights.to(self.dtype)
            self._persample.set_batch(self._sample_weights, grad_scale=self.backend.grad_scale / loss_scale)
            weight = weights.sum()
        elif self.spec.granularity == "microbatch":
            # an all-padding micro-batch (uneven data across ranks) carries no gradient and no weight
            weight = (tokens * mask).sum() if self.spec.token_weighted else (mask.sum() > 0).to(torch.float64)
            if self._persample is not None:  # frozen targets: unit weights, so `first` is the gradient
                self._persample.set_batch(torch.ones_like(mask, dtype=self.dtype))
        else:
            weight = torch.ones((), dtype=torch.float64, device=mask.device)
        counts = {"weight": weight} if self.spec.granularity != "batch" else {}
        if count:
            counts.update(samples=mask.sum(), tokens=(tokens * mask).sum())
        return weight.to(self.dtype), counts

    def rescale(self, factors: torch.Tensor) -> None:
        """Sample granularity, squared statistics: the backward now running carries ``factors[i]`` times
        sample i's gradient of its mean token NLL, whatever scale ``record()`` assumed (a loss averaged by a
        framework, measured at the logits by :mod:`fisherdist.integrations.hf`). Call it during backward,
        before the gradient reaches the targets; a factor of 0 (no label token) leaves the weight as is."""
        if self._persample is None or self._sample_weights is None or self.spec.granularity != "sample" \
                or "first" in self.spec.stats:
            raise FisherdistError("FisherAccumulator.rescale(): needs granularity sample, an estimator with squared "
                                  "statistics only, and an open record() block")
        f = factors.to(self._sample_weights)
        f = torch.where(f == 0, torch.ones_like(f), f)
        self._persample.set_batch(self._sample_weights / (f * f), grad_scale=1.0)

    def cancel(self) -> None:
        """The current ``record()`` block is left without a backward (a NaN retry): it counts nothing."""
        self._counts = {}

    def step(self, *, optimizer_step: bool = True) -> None:
        """Close the micro-batch: reduce what the backend did not, square the reduced grad for ``batch``.
        ``optimizer_step=False`` while accumulating micro-batches of one optimizer step (decay waits)."""
        if self.spec.granularity == "batch":
            self._add_reduced_grads()
            self._step_counts.update(weight=torch.ones((), dtype=torch.float64))
        else:
            self._reduce_leftovers()
        self._active.count(steps=1.0, **self._step_counts)
        self._step_counts = {}
        self._pending.clear()
        self._delivered.clear()
        if optimizer_step:
            self._active.decay_due = True

    def _add_reduced_grads(self) -> None:
        for fqn, p in self.targets.items():
            g = self.backend.reduced_grad(fqn, p)
            if g is None:
                raise FisherdistError(f"batch granularity: parameter {fqn} has no gradient at step()")
            g = g.to(self.dtype)
            for stat in self.spec.stats:
                self._active.add(stat, fqn, g * g if stat == "sq" else g)

    def _reduce_leftovers(self) -> None:
        """Statistics no backend hook delivered (frozen or unused targets, DeepSpeed): one reduce-scatter."""
        leftovers = {}
        for fqn in self.targets:
            if fqn in self._delivered:
                continue
            stats = self._pending.pop(fqn, None)
            if stats is None:  # unused on this rank: zeros keep the collective identical on every rank
                shape = self.placement.shapes[fqn]
                stats = [torch.zeros(shape, dtype=self.dtype, device=self._device) for _ in self.spec.stats]
            leftovers[fqn] = stats
        for fqn, frags in reduce_scatter_to_owners(leftovers, self.placement, self.backend.group).items():
            self.deliver(fqn, frags)

    # -- reading ------------------------------------------------------------------------------------
    def fragment(self, fqn: str) -> Fragment:
        return self.placement.fragment(fqn)

    def num_samples(self, state: str = DEFAULT_STATE) -> float:
        return self._read(state).global_counts()["samples"]

    def fisher(self, fqn: str, *, counts: dict[str, float] | None = None, state: str = DEFAULT_STATE) -> torch.Tensor:
        """This rank's fragment in the MEAN convention (estimator-specific, see ``FisherSpec``); pass
        ``counts`` (``state.global_counts()``) when reading many parameters to avoid a collective each.
        With ``decay`` this is the bias-corrected EMA, readable after any step."""
        st = self._read(state)
        n = (counts or st.global_counts())["weight"]
        if n <= 0:
            raise FisherdistError("no samples accumulated yet")
        b = st.buffers
        if self.spec.estimator == "centered":
            mean = b["first"][fqn] / n
            return (b["sq"][fqn] / n - mean * mean).clamp_min(0)
        if self.spec.estimator == "rank1":
            return b["first"][fqn] / n
        return b["sq"][fqn] / n

    def summary(self, state: str = DEFAULT_STATE) -> dict[str, torch.Tensor]:
        """Row sums, column sums and total of every target's mean-convention Fisher (``<name>.row`` ...),
        from each rank's fragments: small vectors are reduced, no matrix is gathered (collective)."""
        counts = self._read(state).global_counts()
        fragments = {f: (self.fragment(f), self.fisher(f, counts=counts, state=state)) for f in self.targets}
        return summarise(fragments, self.backend.group)

    def full_fisher(self, fqn: str, state: str = DEFAULT_STATE) -> torch.Tensor:
        """Gather the whole tensor (collective; for tests and export of small models)."""
        local = self.fisher(fqn, state=state)
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
        self.backend.remove(self)
        if self._persample is not None:
            self._persample.detach()
