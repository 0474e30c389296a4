"""DeepSpeed ZeRO-1/2/3: local statistics from public hooks, reduced by ONE bucketed collective of ours.

DeepSpeed has no reduction hook to ride (its reduction is private and differs per stage), so:

* ``sample``: the per-sample module hooks; ``microbatch``: the accumulator's ``param.register_hook`` on
  the user's parameters, which sees the LOCAL, unreduced micro-batch gradient on every stage. Either way
  the statistics are full-shaped local tensors that the accumulator reduces at ``acc.step()`` with one
  ``reduce_scatter`` on the engine's data-parallel group, landing on the rank that owns the same
  elements of the gradient (the adapter's placement).
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

import math

import torch
from torch import nn

from fisherdist.distributed.wrap_deepspeed import grad_epoch
from fisherdist.errors import FisherdistError
from fisherdist.fisher.backends import zero_internals as zi
from fisherdist.fisher.backends.base import Backend
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.targets import param_shape


class ZeroBackend(Backend):
    fuses_local_grads = False

    def __init__(self, model: nn.Module, group: object = None) -> None:
        zi.check(model)
        super().__init__(model, group or zi.dp_group(model))
        self.stage = int(model.zero_optimization_stage())  # type: ignore[operator]
        self.name = f"zero{self.stage}"
        self.grad_scale = float(model.gradient_accumulation_steps())  # type: ignore[operator]
        self._placement: Placement | None = None
        self._read_at: dict[str, tuple[int, int]] = {}  # grad_epoch at each parameter's last batch read

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
