"""FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``): statistics ride in FSDP1's reduce-scatter.

FSDP1's comm hook ``hook(state, grad, output)`` gets the padded flat LOCAL gradient of one FlatParameter
and must reduce-scatter it itself. We lay each target's local statistics out exactly like its gradient
inside the flat parameter (same offsets, same padding) as extra columns of the ``(world, chunk)`` input, so
ONE ``reduce_scatter_tensor`` lands the gradient shard and the statistics of the same elements on the
owning rank. The root-level ``register_comm_hook`` does not say which FlatParameter a call belongs to, so
each FSDP unit gets its own hook state that knows its FlatParameter.

Private attributes used (checked by ``tests/test_contracts.py``; see :mod:`.fsdp1_internals`):
``FullyShardedDataParallel._handle``, ``._comm_hook``, ``._comm_hook_state``, ``FlatParameter._params``,
``._shapes``, ``._numels_with_padding``, ``._is_padding_mask``, ``._shard_param_infos``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._comm_hooks.default_hooks import DefaultState, reduce_scatter_hook

from fisherdist.errors import FisherdistError
from fisherdist.fisher.backends import fsdp1_internals as fi
from fisherdist.fisher.backends.base import Backend, StatSink
from fisherdist.fisher.layout import Placement


class UnitHookState(DefaultState):
    """One FSDP unit's comm-hook state: its FlatParameter's targets and where they sit in the flat tensor.

    Inherits DefaultState's pre/post divide factors (pre * post = world) so the gradient is reduced exactly
    as FSDP1's default path does; the statistics are never divided (they are SUMS over ranks).
    """

    def __init__(self, group: dist.ProcessGroup, layout: fi.FlatLayout, fqn_of: dict[int, str],
                 placement: Placement, sink: StatSink) -> None:
        super().__init__(group)
        self.layout, self.placement, self.sink = layout, placement, sink
        self.targets = [(i, fqn_of[id(p)]) for i, p in enumerate(layout.params) if id(p) in fqn_of]


def fused_hook(state: UnitHookState, grad: torch.Tensor, output: torch.Tensor) -> None:
    """``reduce_scatter_hook`` with the unit's target statistics appended as extra columns."""
    sink, layout = state.sink, state.layout
    if not (state.targets and sink.recording()):
        return reduce_scatter_hook(state, grad, output)
    world = state.world_size
    stat_flats: list[torch.Tensor] = []
    owners = []
    for i, fqn in state.targets:
        off, numel = layout.offsets[i], layout.numels[i]
        local = grad[off : off + numel].view(layout.shapes[i]) if sink.fuses_grads else None
        stats = sink.local_stats(fqn, local)
        if stats is None:
            continue
        if not stat_flats:  # transient, one padded-flat-gradient-sized buffer per statistic (like FSDP's own)
            stat_flats = [grad.new_zeros(grad.numel()) for _ in stats]
        for flat, s in zip(stat_flats, stats):
            flat[off : off + numel] = s.reshape(-1).to(grad.dtype)
        owners.append((i, fqn))
    if not owners:
        return reduce_scatter_hook(state, grad, output)
    pre = state.gradient_predivide_factor
    grad_part = grad / pre if pre > 1 else grad
    fused = torch.cat([grad_part.view(world, -1)] + [f.view(world, -1) for f in stat_flats], dim=1)
    out = torch.empty(fused.shape[1], dtype=fused.dtype, device=fused.device)
    dist.reduce_scatter_single(out, fused.reshape(-1), group=state.process_group)
    chunk = output.numel()
    output.copy_(out[:chunk])
    if state.gradient_postdivide_factor > 1:
        output.div_(state.gradient_postdivide_factor)
    shard_start = state.placement.rank * chunk
    for i, fqn in owners:
        start, numel = state.placement.ranges[fqn][state.placement.rank]
        lo = layout.offsets[i] + start - shard_start  # position inside this rank's chunk
        state.sink.deliver(fqn, [out[(k + 1) * chunk + lo : (k + 1) * chunk + lo + numel] for k in range(len(stat_flats))])
    return None


class FSDP1Backend(Backend):
    name = "fsdp1"
    fuses_local_grads = True

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        units = fi.units(model)
        super().__init__(model, group or units[0].process_group)
        self.units = units
        self._layouts = {id(u): fi.flat_layout(u) for u in units}
        self._placement: Placement | None = None
        self._installed: list[object] = []

    def _find(self, p: nn.Parameter) -> tuple[fi.FlatLayout, int] | None:
        for layout in self._layouts.values():
            for i, q in enumerate(layout.params):
                if q is p:
                    return layout, i
        return None

    def placement(self, targets: dict[str, nn.Parameter]) -> Placement:
        """Each target's range of the flattened param on every rank, from its offset in the FlatParameter
        and the ``ceil(padded / world)`` shard cut (no communication; checked against FSDP's own
        ``_shard_param_infos`` for this rank)."""
        shapes, ranges = {}, {}
        for fqn, p in targets.items():
            found = self._find(p)
            if found is None:
                raise FisherdistError(f"fsdp1 backend: target {fqn} is not managed by any FSDP unit")
            layout, i = found
            shapes[fqn] = layout.shapes[i]
            ranges[fqn] = layout.ranges(i, self.world)
            mine = layout.local_range(i)
            if ranges[fqn][self.rank] != mine:
                raise FisherdistError(f"fsdp1 backend: computed shard of {fqn} {ranges[fqn][self.rank]} != FSDP's {mine}")
        self._placement = Placement(self.rank, self.world, shapes, ranges)
        self._placement.validate()
        return self._placement

    def install(self, sink: StatSink) -> None:
        assert self._placement is not None, "placement() must run before install()"
        fqn_of = {id(p): f for f, p in sink.targets.items()}
        for unit in self.units:
            layout = self._layouts[id(unit)]
            state = UnitHookState(unit.process_group, layout, fqn_of, self._placement, sink)
            if state.targets:
                fi.set_unit_hook(unit, fused_hook, state)
                self._installed.append(unit)

    def remove(self) -> None:
        for unit in self._installed:
            fi.clear_unit_hook(unit)
        self._installed.clear()

    def reduced_grad(self, fqn: str, param: nn.Parameter) -> torch.Tensor | None:
        """The local shard of the reduced (rank-averaged) gradient: ``use_orig_params`` exposes it as a 1-D
        view of this rank's part of the param (size 0 where the shard holds none of it)."""
        assert self._placement is not None
        numel = self._placement.ranges[fqn][self.rank][1]
        if param.grad is None:
            return param.new_zeros(0) if numel == 0 else None
        return param.grad.reshape(-1)[:numel]
