"""FSDP2 (``fully_shard``): statistics reduced inside FSDP2's reduce-scatter hook, unit by unit.

``FSDPModule.set_custom_reduce_scatter`` is called with the chunk-concatenated local gradients of one
parameter group, laid out ``(world, shard_numel)``. We let FSDP reduce its gradients as it would, then,
in the same call (same group, same stream), reduce-scatter the group's statistics laid out in the same
dim-0 chunk layout, so they land on the rank that owns those rows. They travel in their own collectives
of at most ``fisher.bucket_mb`` (:class:`~fisherdist.fisher.comm.ColumnBuckets`), in their own dtype:
fusing them into the gradient's collective (principle 2) meant copying the unit's gradients and
statistics into one send buffer next to a second output buffer, and measured 2.5x the full statistics
per rank (principle 9 wins); now a rank holds its owned share, the unit's statistics being formed and
one bucket (``tests/test_fisher_memory.py``, BENCHMARKS.md).

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
from fisherdist.fisher.backends.fused import SinkSet
from fisherdist.fisher.comm import DEFAULT_BUCKET_MB, ColumnBuckets, dim0_chunk_layout
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.targets import param_shape

_COMM = "_fisherdist_reduce_scatter"  # our StatsReduceScatter on an FSDPModule


def _predivide(param_group: FSDPParamGroup, group: dist.ProcessGroup, dtype: torch.dtype, device: torch.device) -> float:
    """FSDP divided its input by this factor (fp16/fp64 overflow guard); statistics formed from it undo it."""
    pre, _post, _op, _ = _get_gradient_divide_factors(
        group, None, dtype, device.type,
        param_group.gradient_divide_factor,
        param_group.force_sum_reduction_for_comms,
    )
    return float(pre or 1.0)


class StatsReduceScatter(DefaultReduceScatter):
    """One FSDP2 parameter group's reduce-scatter: FSDP's gradients, then the statistics of every accumulator."""

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

    def _reduce_stats(self, input_2d: torch.Tensor, group: dist.ProcessGroup) -> None:
        """Form every recording sink's statistics of this group's targets one parameter at a time (dim-0
        chunk layout) and reduce-scatter them in buckets, so at most one bucket is copied at a time."""
        world = input_2d.shape[0]
        pre = _predivide(self.group_state, group, input_2d.dtype, input_2d.device)
        grad_cols: dict[int, torch.Tensor] | None = None
        buckets: ColumnBuckets | None = None
        for sink in self.sinks.recording():
            if sink.fuses_grads and grad_cols is None:
                grad_cols = self._grad_columns(input_2d)
            if buckets is None:
                spec = getattr(sink, "spec", None)
                buckets = ColumnBuckets(group, int(float(getattr(spec, "bucket_mb", DEFAULT_BUCKET_MB)) * 2**20))
            for fp, fqn in self.targets[id(sink)]:
                col = grad_cols.get(id(fp)) if sink.fuses_grads and grad_cols is not None else None
                stats = sink.local_stats(fqn, None if col is None else col * pre)  # predivide undone
                if stats is not None:
                    buckets.add(sink, fqn, [t if col is not None else dim0_chunk_layout(t, world) for t in stats])
        if buckets is not None:
            buckets.flush()

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,  # type: ignore[override]
                 op: dist.ReduceOp.RedOpType, async_op: bool = False) -> dist.Work | None:
        work = super().__call__(output_tensor, input_tensor, group, op, async_op)
        if any(True for _ in self.sinks.recording()):
            self._reduce_stats(input_tensor.view(group.size(), -1), group)
        return work


class FSDP2Backend(Backend):
    name = "fsdp2"
    fuses_local_grads = True
    hooks_param_grads = False

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(model, group)
        # on one rank FSDP2 never calls its reduce-scatter hook, and it assigns the sharded parameters'
        # gradients outside autograd: the accumulator forms micro-batch gradients from per-sample ones
        self.fuses_local_grads = self.world > 1
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
        """One ``StatsReduceScatter`` per FSDP module (the last ``set_custom_reduce_scatter`` wins), shared
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
                comm = StatsReduceScatter(groups[0])
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
            if isinstance(comm, StatsReduceScatter) and comm.sinks.discard(sink):
                module.set_custom_reduce_scatter(DefaultReduceScatter())
                delattr(module, _COMM)
        self._installed.clear()

    def reduced_grad(self, fqn: str, param: nn.Parameter) -> torch.Tensor | None:
        grad = param.grad
        return None if grad is None else (grad.to_local() if isinstance(grad, DTensor) else grad).reshape(-1)
