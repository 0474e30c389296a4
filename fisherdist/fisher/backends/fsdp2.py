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

from fisherdist.errors import FisherdistError
from fisherdist.fisher.backends.base import Backend, StatSink
from fisherdist.fisher.comm import dim0_chunk_layout
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.targets import param_shape


def _divide_factors(param_group: object, group: dist.ProcessGroup, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """``(pre, sum_scale)``: FSDP divided its input by ``pre`` (fp16/fp64 overflow guard) and the collective
    scales a sum by ``1/sum_scale`` (AVG, PREMUL_SUM). Statistics undo both, so they stay plain sums."""
    pre, _post, op, _ = _get_gradient_divide_factors(
        group, None, dtype, device.type,
        param_group.gradient_divide_factor,  # type: ignore[attr-defined]
        param_group.force_sum_reduction_for_comms,  # type: ignore[attr-defined]
    )
    world = group.size()
    if op == dist.ReduceOp.AVG:
        scale = float(world)
    elif op == dist.ReduceOp.SUM:
        scale = 1.0
    else:  # PREMUL_SUM(1 / gradient_divide_factor)
        scale = float(param_group.gradient_divide_factor)  # type: ignore[attr-defined]
    return float(pre or 1.0), scale


class FusedStatsReduceScatter(DefaultReduceScatter):
    """One FSDP2 parameter group's reduce-scatter, carrying [gradients | statistics]."""

    def __init__(self, param_group: object, fqn_of: dict[int, str], placement: Placement, sink: StatSink) -> None:
        self.group_state = param_group
        self.fsdp_params = list(param_group.fsdp_params)  # type: ignore[attr-defined]
        self.fqn_of = fqn_of
        self.placement = placement
        self.sink = sink
        self.targets = [fp for fp in self.fsdp_params if id(fp.sharded_param) in fqn_of]

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

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):  # type: ignore[override]
        if not (self.targets and self.sink.recording()):
            return super().__call__(output_tensor, input_tensor, group, op, async_op)
        world = group.size()
        pre, scale = _divide_factors(self.group_state, group, input_tensor.dtype, input_tensor.device)
        input_2d = input_tensor.view(world, -1)
        grad_cols = self._grad_columns(input_2d) if self.sink.fuses_grads else {}
        blocks, owners = [], []
        for fp in self.targets:
            fqn = self.fqn_of[id(fp.sharded_param)]
            col = grad_cols.get(id(fp))
            local = None if col is None else col * pre  # FSDP's (world, chunk) layout, predivide undone
            stats = self.sink.local_stats(fqn, local)
            if stats is None:
                continue
            laid = [t if t.dim() == 2 and t.shape[0] == world and col is not None else dim0_chunk_layout(t, world) for t in stats]
            blocks.extend(laid)
            owners.append((fqn, [b.shape[1] for b in laid]))
        if not blocks:
            return super().__call__(output_tensor, input_tensor, group, op, async_op)
        fused = torch.cat([input_2d] + [b.to(input_tensor.dtype) for b in blocks], dim=1)
        out = torch.empty(fused.shape[1], dtype=fused.dtype, device=fused.device)
        dist.reduce_scatter_single(out, fused.reshape(-1), group=group, op=op)
        output_tensor.copy_(out[: input_2d.shape[1]])
        pos = input_2d.shape[1]
        for fqn, widths in owners:
            numel = self.placement.ranges[fqn][self.placement.rank][1]
            frags = []
            for w in widths:
                frags.append(out[pos : pos + numel] * scale)
                pos += w
            self.sink.deliver(fqn, frags)
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
        assert self._placement is not None, "placement() must run before install()"
        fqn_of = {id(p): f for f, p in sink.targets.items()}
        for module in self.model.modules():
            if not isinstance(module, FSDPModule):
                continue
            groups = module._get_fsdp_state()._fsdp_param_groups
            if len(groups) > 1:
                raise FisherdistError("fsdp2 backend: modules with several parameter groups (per-parameter meshes) are not supported")
            if groups and any(id(fp.sharded_param) in fqn_of for fp in groups[0].fsdp_params):
                module.set_custom_reduce_scatter(FusedStatsReduceScatter(groups[0], fqn_of, self._placement, sink))
                self._installed.append(module)

    def remove(self) -> None:
        for module in self._installed:
            module.set_custom_reduce_scatter(DefaultReduceScatter())
        self._installed.clear()

    def reduced_grad(self, fqn: str, param: nn.Parameter) -> torch.Tensor | None:
        return None if param.grad is None else param.grad.to_local().reshape(-1)
