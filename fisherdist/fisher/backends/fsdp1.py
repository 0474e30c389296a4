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
from torch.distributed.fsdp import FullyShardedDataParallel

from fisherdist.errors import FisherdistError
from fisherdist.fisher.backends import fsdp1_internals as fi
from fisherdist.fisher.backends.base import Backend, StatSink
from fisherdist.fisher.backends.fused import SinkSet, reduce_scatter_columns
from fisherdist.fisher.layout import Placement


class UnitHookState(DefaultState):
    """One FSDP unit's comm-hook state: the accumulators it feeds and where their targets sit in its flat tensor.

    Inherits DefaultState's pre/post divide factors (pre * post = world) so the gradient is reduced exactly
    as FSDP1's default path does; the statistics are never divided (they are SUMS over ranks).
    """

    def __init__(self, group: dist.ProcessGroup, layout: fi.FlatLayout) -> None:
        super().__init__(group)
        self.layout = layout
        self.sinks = SinkSet()
        self.targets: dict[int, list[tuple[int, str]]] = {}  # id(sink) -> (index in the flat param, fqn)

    def add(self, sink: StatSink) -> bool:
        """Register ``sink`` if this unit holds any of its targets."""
        fqn_of = {id(p): f for f, p in sink.targets.items()}
        mine = [(i, fqn_of[id(p)]) for i, p in enumerate(self.layout.params) if id(p) in fqn_of]
        if mine:
            self.sinks.add(sink)
            self.targets[id(sink)] = mine
        return bool(mine)


def _unit_stats(state: UnitHookState, grad: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[StatSink, str, int]]]:
    """Every recording sink's statistics of this unit's targets, laid out as columns of their owners."""
    layout = state.layout
    blocks: list[torch.Tensor] = []
    owners: list[tuple[StatSink, str, int]] = []
    for sink in state.sinks.recording():
        for i, fqn in state.targets[id(sink)]:
            off, numel = layout.offsets[i], layout.numels[i]
            local = grad[off : off + numel].view(layout.shapes[i]) if sink.fuses_grads else None
            stats = sink.local_stats(fqn, local)
            if stats is not None:
                blocks.extend(sink.placement.columns(fqn, s) for s in stats)
                owners.append((sink, fqn, len(stats)))
    return blocks, owners


def fused_hook(state: UnitHookState, grad: torch.Tensor, output: torch.Tensor) -> None:
    """``reduce_scatter_hook`` with the unit's target statistics appended as extra columns (one extra
    collective only for statistics whose dtype differs from the gradient's)."""
    blocks, owners = _unit_stats(state, grad)
    if not blocks:
        reduce_scatter_hook(state, grad, output)
        return
    pre = state.gradient_predivide_factor
    grad_part = (grad / pre if pre > 1 else grad).view(state.world_size, -1)
    grad_out, outs, _ = reduce_scatter_columns(grad_part, blocks, state.process_group)
    assert grad_out is not None
    output.copy_(grad_out)
    if state.gradient_postdivide_factor > 1:
        output.div_(state.gradient_postdivide_factor)
    k = 0
    for sink, fqn, n in owners:
        numel = sink.placement.ranges[fqn][sink.placement.rank][1]
        sink.deliver(fqn, [outs[k + j][:numel] for j in range(n)])
        k += n


class FSDP1Backend(Backend):
    name = "fsdp1"
    fuses_local_grads = True

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        units = fi.units(model)
        super().__init__(model, group or fi.process_group(units[0]))
        self.units = units
        self._layouts = {id(u): fi.flat_layout(u) for u in units}
        self._placement: Placement | None = None
        self._installed: list[FullyShardedDataParallel] = []

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

    def stats_placement(self, targets: dict[str, nn.Parameter]) -> Placement:
        """Sample / micro-batch statistics are formed locally and reduced by our own columns, so they need
        not follow FSDP's flat shard (which puts a parameter subset such as LoRA adapters on one rank):
        ``ceil(numel/world)`` flat chunks of every target, i.e. at most one chunk per target above even."""
        shapes = {}
        for fqn, p in targets.items():
            found = self._find(p)
            if found is None:
                raise FisherdistError(f"fsdp1 backend: target {fqn} is not managed by any FSDP unit")
            shapes[fqn] = found[0].shapes[found[1]]
        return Placement.flat_chunks(shapes, self.rank, self.world)

    def install(self, sink: StatSink) -> None:
        for unit in self.units:
            state = fi.unit_hook_state(unit)
            if not isinstance(state, UnitHookState):
                state = UnitHookState(fi.process_group(unit), self._layouts[id(unit)])
                if not state.add(sink):
                    continue
                fi.set_unit_hook(unit, fused_hook, state)
            elif not state.add(sink):
                continue
            self._installed.append(unit)

    def remove(self, sink: StatSink) -> None:
        for unit in self._installed:
            state = fi.unit_hook_state(unit)
            if isinstance(state, UnitHookState) and state.sinks.discard(sink):
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
