"""DeepSpeed ZeRO-1/2/3: local statistics from public hooks, reduced by ONE bucketed collective of ours.

DeepSpeed has no reduction hook to ride (its reduction is private and differs per stage), so:

* ``sample``: the per-sample module hooks; ``microbatch``: the accumulator's ``param.register_hook`` on
  the user's parameters, which sees the LOCAL, unreduced micro-batch gradient on every stage. Either way
  a parameter's statistics are full-shaped local tensors, ready before its gradient is accumulated. A
  ``register_post_accumulate_grad_hook`` (public, fires on every stage) streams them into a
  :class:`~fisherdist.fisher.comm.BucketedReduceScatter` on the engine's data-parallel group: fixed
  ``fisher.bucket_mb`` buckets in reverse parameter order (backward's order), each reduced as soon as it
  is complete onto the ranks that own its elements of the gradient (the adapter's placement). Peak
  statistics memory per rank: its owned share + one bucket + the statistics of the parameter in flight,
  never the full size. Frozen targets (no gradient hook) are picked up at the next hook of any trainable
  parameter, and whatever is left at the end of backward goes out then, zero-filled where a parameter
  took no part.
* ``batch``: the boundary-reduced gradient fragment, read between ``engine.backward`` and
  ``engine.step`` (ZeRO-1/2: ``_hp_mapping.get_lp_grad_fragment``; ZeRO-3: ``safe_get_local_grad``). It is
  the gradient averaged over data-parallel ranks AND summed over the gradient-accumulation micro-steps of
  the GAS-scaled loss, i.e. the gradient of the mean loss over all ``GAS x world`` micro-batches.

``grad_scale`` = gradient_accumulation_steps: ``engine.backward`` divides the loss by it, hooks see
``grad / GAS``; local statistics undo that. Placement: ZeRO-3 = ``ceil(numel/world)`` flat chunks of every
parameter; ZeRO-1/2 = each rank's fragment of the flattened, padded param group (``lp_fragment_address``),
and our own flat chunks for frozen parameters the optimizer does not partition.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from fisherdist.distributed.wrap_deepspeed import grad_epoch
from fisherdist.errors import FisherdistError
from fisherdist.fisher.backends import zero_internals as zi
from fisherdist.fisher.backends.base import Backend, StatSink
from fisherdist.fisher.comm import DEFAULT_BUCKET_MB, BucketedReduceScatter, bucket_numel
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.targets import param_shape


class ZeroBackend(Backend):
    fuses_local_grads = False

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        zi.check(model)
        super().__init__(model, group or zi.dp_group(model))
        self.stage = int(model.zero_optimization_stage())  # type: ignore[operator]
        self.name = f"zero{self.stage}"
        self.grad_scale = float(model.gradient_accumulation_steps())  # type: ignore[operator]
        self._placement: Placement | None = None
        self._read_at: dict[str, tuple[int, int]] = {}  # grad_epoch at each parameter's last batch read
        self._stream: _Stream | None = None

    def placement(self, targets: dict[str, nn.Parameter]) -> Placement:
        shapes = {f: param_shape(p) for f, p in targets.items()}
        if self.stage == 3:
            for fqn, p in targets.items():
                zi.check_zero3_chunks(fqn, p, self.world)
            placement = Placement.flat_chunks(shapes, self.rank, self.world)
        else:
            local = {f: a for f, p in targets.items() if (a := zi.fragment_address(p)) is not None}
            placement = Placement.from_local(shapes, local, self.group)
            chunks = Placement.flat_chunks(shapes, self.rank, self.world)
            for fqn, ranges in placement.ranges.items():  # frozen: no optimizer partition, use flat chunks
                if all(n == 0 for _, n in ranges) and math.prod(shapes[fqn]) > 0:
                    placement.ranges[fqn] = chunks.ranges[fqn]
        placement.validate()
        self._placement = placement
        return placement

    def install(self, sink: StatSink) -> None:
        assert self._placement is not None, "placement() must run before install()"
        if self.world > 1:  # one rank: the accumulator adds its local statistics straight into the sums
            self._stream = _Stream(sink, self._placement, self.group, self.unwrapped)

    def remove(self, sink: StatSink) -> None:
        """One stream per backend instance, and every accumulator builds its own backend."""
        if self._stream is not None:
            self._stream.remove()
        self._stream = None

    def reduced_grad(self, fqn: str, param: nn.Parameter) -> torch.Tensor | None:
        assert self._placement is not None, "placement() must run before reduced_grad()"
        numel = self._placement.ranges[fqn][self.rank][1]
        self._check_fresh(fqn)
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            g = safe_get_local_grad(param)
            return None if g is None else g.reshape(-1)[:numel]
        try:
            g = zi.lp_grad_fragment(param)
        except ValueError as err:  # DeepSpeed: "only available immediately after backward and before step"
            raise FisherdistError(f"zero{self.stage} batch granularity: call acc.step() between engine.backward() at the "
                                  f"gradient-accumulation boundary and engine.step() ({err})") from err
        if g is None:
            return param.new_zeros(0) if numel == 0 else None
        return g

    def _check_fresh(self, fqn: str) -> None:
        """ZeRO clears its accumulated gradient partitions only in ``engine.step()``: reading twice without a
        step (or off the accumulation boundary) would square a sum over several optimizer steps."""
        engine = self.model
        if not engine.is_gradient_accumulation_boundary():  # type: ignore[operator]
            raise FisherdistError(f"{self.name} batch granularity: acc.step() must run after engine.backward() at a "
                                  "gradient-accumulation boundary (the reduced gradient exists only there)")
        epoch = grad_epoch(engine)  # type: ignore[arg-type]
        if self._read_at.get(fqn) == epoch:
            raise FisherdistError(f"{self.name} batch granularity: call engine.step() (Wrapped.step()) or "
                                  "Wrapped.clear_grads() after acc.step(); DeepSpeed keeps accumulating gradients until then")
        self._read_at[fqn] = epoch

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "zero_stage": self.stage,
                "grad_scale_meaning": "gradient_accumulation_steps (engine.backward divides the loss by it)",
                "batch_grad_meaning": "mean over data-parallel ranks of the sum over GAS micro-steps of grad(loss/GAS)"}


class _Stream:
    """Moves a sink's local statistics into the bucketed reduce-scatter while backward runs."""

    def __init__(self, sink: StatSink, placement: Placement, group: dist.ProcessGroup | None, model: nn.Module) -> None:
        spec = getattr(sink, "spec", None)  # the accumulator's FisherSpec: bucket size and statistics
        dtype = getattr(sink, "dtype", torch.float32)
        self.sink = sink
        self.order = list(reversed(sink.targets))  # backward reaches the last parameters first
        self.frozen = [f for f, p in sink.targets.items() if not p.requires_grad]
        n_stats = len(spec.stats) if spec is not None else 1
        numel = bucket_numel(float(getattr(spec, "bucket_mb", DEFAULT_BUCKET_MB)), dtype)
        self.reducer = BucketedReduceScatter(placement, self.order, n_stats, numel, sink.deliver, group)
        device = next(iter(sink.targets.values())).device
        self.like = torch.zeros((), dtype=dtype, device=device)
        self.armed = False
        ticks: dict[int, tuple[str | None, nn.Parameter]] = {
            id(p): (f, p) for f, p in sink.targets.items() if p.requires_grad}
        if self.frozen:  # frozen targets have no gradient hook: any trainable parameter's hook polls them
            ticks.update({id(p): (None, p) for p in model.parameters() if p.requires_grad and id(p) not in ticks})
        self.handles = [p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, f))  # type: ignore[no-untyped-call]
                        for f, p in ticks.values()]

    def _on_grad(self, fqn: str | None, _param: torch.Tensor) -> None:
        if not self.sink.recording():
            return
        if not self.armed:
            self.armed = True
            zi.at_backward_end(self._end_backward)
        for f in ([fqn] if fqn is not None else []) + self.frozen:
            self._collect(f)

    def _collect(self, fqn: str) -> None:
        if not self.reducer.has(fqn):
            stats = self.sink.local_stats(fqn, None)
            if stats is not None:
                self.reducer.add(fqn, stats)

    def _end_backward(self) -> None:
        """Everything still local goes out now, in plan order on every rank (zeros where nothing came)."""
        self.armed = False
        for f in self.order:
            self._collect(f)
        self.reducer.flush(self.like)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
