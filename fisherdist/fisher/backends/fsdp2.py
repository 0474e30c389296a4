"""FSDP2 (``fully_shard``): statistics ride in FSDP2's own reduce-scatter.

``FSDPModule.set_custom_reduce_scatter`` receives the chunk-concatenated local gradients of one parameter
group, laid out ``(world, shard_numel)``. We append the local statistics of the group's target parameters
in the same dim-0 chunk layout as extra columns and issue ONE ``reduce_scatter_tensor``: the gradient half
is handed back to FSDP untouched, the statistics half lands on the rank that owns those rows.

Private attributes used (checked by ``tests/test_contracts.py`` for the pinned torch range):
``FSDPModule._get_fsdp_state()._fsdp_param_groups``, ``FSDPParamGroup.fsdp_params``,
``FSDPParamGroup.gradient_divide_factor``, ``.force_sum_reduction_for_comms``,
``_fsdp_collectives._get_gradient_divide_factors``, ``FSDPParam.sharded_param``, ``.padded_sharded_param_size``,
``.fsdp_placement``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter, _get_gradient_divide_factors
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
from torch.distributed.tensor import DTensor

from fisherdist.errors import FisherdistError
from fisherdist.fisher.backends.base import Backend, StatSink
from fisherdist.fisher.backends.fused import SinkSet, reduce_scatter_columns
from fisherdist.fisher.comm import dim0_chunk_layout
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.targets import param_shape

_COMM = "_fisherdist_reduce_scatter"  # our FusedStatsReduceScatter on an FSDPModule


def _divide_factors(param_group: FSDPParamGroup, group: dist.ProcessGroup, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """``(pre, sum_scale)``: FSDP divided its input by ``pre`` (fp16/fp64 overflow guard) and the collective
    scales a sum by ``1/sum_scale`` (AVG, PREMUL_SUM). Statistics undo both, so they stay plain sums."""
    pre, _post, op, _ = _get_gradient_divide_factors(
        group, None, dtype, device.type,
        param_group.gradient_divide_factor,
        param_group.force_sum_reduction_for_comms,
    )
    world = group.size()
    if op == dist.ReduceOp.AVG:
        scale = float(world)
    elif op == dist.ReduceOp.SUM:
        scale = 1.0
    else:  # PREMUL_SUM(1 / gradient_divide_factor)
        scale = float(param_group.gradient_divide_factor or world)
    return float(pre or 1.0), scale


class FusedStatsReduceScatter(DefaultReduceScatter):
    """One FSDP2 parameter group's reduce-scatter, carrying [gradients | statistics of every accumulator]."""

    def __init__(self, param_group: FSDPParamGroup) -> None:
        self.group_state = param_group
        self.fsdp_params = list(param_group.fsdp_params)
        self.sinks = SinkSet()
        self.targets: dict[int, list[tuple[FSDPParam, str]]] = {}  # id(sink) -> its targets in this group

    def add(self, sink: StatSink) -> bool:
        """Register ``sink`` if this group holds any of its targets."""
        fqn_of = {id(p): f for f, p in sink.targets.items()}
        mine = [(fp, fqn_of[id(fp.sharded_param)]) for fp in self.fsdp_params if id(fp.sharded_param) in fqn_of]
        if mine:
            self.sinks.add(sink)
            self.targets[id(sink)] = mine
        return bool(mine)

    def _grad_columns(self, input_2d: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each gradient-carrying param's ``(world, chunk)`` column block inside FSDP's input."""
        with_grad = [fp for fp in self.fsdp_params if fp.sharded_param.requires_grad]
        sizes = [fp.padded_sharded_param_size.numel() for fp in with_grad]
        if sum(sizes) != input_2d.shape[1]:
            raise FisherdistError(
                "FSDP2 reduce-scatter input does not match the parameters that require grad "
                f"({sum(sizes)} vs {input_2d.shape[1]} elements per rank): some parameters had no gradient; "
                "use sample granularity or make every target parameter take part in the loss"
            )
        cols, pos = {}, 0
        for fp, n in zip(with_grad, sizes):
            cols[id(fp)] = input_2d[:, pos : pos + n]
            pos += n
        return cols

    def _stats(self, input_2d: torch.Tensor, pre: float) -> tuple[list[torch.Tensor], list[tuple[StatSink, str, int]]]:
        """Every recording sink's statistics of this group's targets in the dim-0 chunk layout."""
        world = input_2d.shape[0]
        blocks, owners = [], []
        grad_cols: dict[int, torch.Tensor] | None = None
        for sink in self.sinks.recording():
            if sink.fuses_grads and grad_cols is None:
                grad_cols = self._grad_columns(input_2d)
            for fp, fqn in self.targets[id(sink)]:
                col = grad_cols.get(id(fp)) if sink.fuses_grads and grad_cols is not None else None
                stats = sink.local_stats(fqn, None if col is None else col * pre)  # predivide undone
                if stats is None:
                    continue
                blocks += [t if col is not None else dim0_chunk_layout(t, world) for t in stats]
                owners.append((sink, fqn, len(stats)))
        return blocks, owners

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,  # type: ignore[override]
                 op: dist.ReduceOp.RedOpType, async_op: bool = False) -> dist.Work | None:
        """FSDP2 ignores the result; the fused path is synchronous and returns None."""
        world = group.size()
        pre, scale = _divide_factors(self.group_state, group, input_tensor.dtype, input_tensor.device)
        input_2d = input_tensor.view(world, -1)
        blocks, owners = self._stats(input_2d, pre)
        if not blocks:
            return super().__call__(output_tensor, input_tensor, group, op, async_op)
        grad_out, outs, fused = reduce_scatter_columns(input_2d, blocks, group, op)
        assert grad_out is not None
        output_tensor.copy_(grad_out)
        k = 0
        for sink, fqn, n in owners:
            numel = sink.placement.ranges[fqn][sink.placement.rank][1]
            sink.deliver(fqn, [outs[k + j][:numel] * (scale if fused[k + j] else 1.0) for j in range(n)])
            k += n
        return None


class FSDP2Backend(Backend):
    name = "fsdp2"
    fuses_local_grads = True

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(model, group)
        self._placement: Placement | None = None
        self._installed: list[FSDPModule] = []

    def placement(self, targets: dict[str, nn.Parameter]) -> Placement:
        for fqn, p in targets.items():
            placements = getattr(p, "placements", None)
            if placements is None or len(placements) != 1 or not placements[0].is_shard(0):
                raise FisherdistError(f"fsdp2 backend: parameter {fqn} is not sharded Shard(0) on a 1-D mesh ({placements})")
        self._placement = Placement.rows({f: param_shape(p) for f, p in targets.items()}, self.rank, self.world)
        return self._placement

    def install(self, sink: StatSink) -> None:
        """One ``FusedStatsReduceScatter`` per FSDP module (the last ``set_custom_reduce_scatter`` wins), shared
        by every accumulator on the model."""
        for module in self.model.modules():
            if not isinstance(module, FSDPModule):
                continue
            groups = module._get_fsdp_state()._fsdp_param_groups
            if len(groups) > 1:
                raise FisherdistError("fsdp2 backend: modules with several parameter groups (per-parameter meshes) are not supported")
            if not groups:
                continue
            comm = getattr(module, _COMM, None)
            if comm is None:
                comm = FusedStatsReduceScatter(groups[0])
                if not comm.add(sink):
                    continue
                module.set_custom_reduce_scatter(comm)
                setattr(module, _COMM, comm)
            elif not comm.add(sink):
                continue
            self._installed.append(module)

    def remove(self, sink: StatSink) -> None:
        for module in self._installed:
            comm = getattr(module, _COMM, None)
            if isinstance(comm, FusedStatsReduceScatter) and comm.sinks.discard(sink):
                module.set_custom_reduce_scatter(DefaultReduceScatter())
                delattr(module, _COMM)
        self._installed.clear()

    def reduced_grad(self, fqn: str, param: nn.Parameter) -> torch.Tensor | None:
        grad = param.grad
        return None if grad is None else (grad.to_local() if isinstance(grad, DTensor) else grad).reshape(-1)
