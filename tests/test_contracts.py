"""Contracts on every private torch / DeepSpeed internal the Fisher engine uses, so an upgrade fails here,
loudly and by name, instead of silently producing wrong statistics.

Covered: FSDP2 (``backends/fsdp2.py``), FSDP1 (``backends/fsdp1_internals.py``) and DeepSpeed ZeRO-1/2/3
(``backends/zero_internals.py``). Signatures are checked statically; attribute presence, types and the
calling convention (which hook receives what) on real 2-rank gloo instances in ONE launch.
"""

from __future__ import annotations

import inspect
import math
import os
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fisherdist.errors import FisherdistError
from tests.distributed import run_distributed


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_fsdp2_private_signatures():
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter, _get_gradient_divide_factors

    assert _params(_get_gradient_divide_factors)[:6] == [
        "reduce_scatter_group", "all_reduce_group", "reduce_dtype", "device_type", "factor", "force_sum_reduction_for_comms"]
    assert len(_get_gradient_divide_factors.__annotations__) >= 6
    for cls in (ReduceScatter, DefaultReduceScatter):
        assert _params(cls.__call__) == ["self", "output_tensor", "input_tensor", "group", "op", "async_op"]
    assert issubclass(DefaultReduceScatter, ReduceScatter)
    assert callable(FSDPModule.set_custom_reduce_scatter) and callable(FSDPModule._get_fsdp_state)


def test_fsdp1_private_signatures():
    from torch.distributed.algorithms._comm_hooks.default_hooks import DefaultState, reduce_scatter_hook
    from torch.distributed.fsdp._flat_param import _ShardParamInfo

    assert _params(reduce_scatter_hook) == ["state", "grad", "output"]
    assert set(DefaultState.__slots__) >= {"process_group", "world_size", "gradient_predivide_factor", "gradient_postdivide_factor"}
    assert _ShardParamInfo._fields == ("in_shard", "offset_in_shard", "numel_in_shard", "intra_param_start_idx",
                                       "intra_param_end_idx")


def test_deepspeed_private_signatures_and_version_guard(monkeypatch):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    import deepspeed
    from deepspeed.utils import safe_get_local_grad

    tensor_fragment = importlib.import_module("deepspeed.utils.tensor_fragment")  # the package shadows the module name

    from fisherdist.fisher.backends import zero_internals as zi

    assert _params(tensor_fragment.tensor_fragment.get_lp_grad_fragment) == ["self", "index_in_param_group"]
    assert {"lp_fragment_address", "gradient_dict", "param_group_index"} <= set(tensor_fragment.tensor_fragment.__dataclass_fields__)
    assert set(tensor_fragment.fragment_address.__dataclass_fields__) == {"numel", "start"}
    assert _params(safe_get_local_grad) == ["param"]
    assert callable(torch.autograd.Variable._execution_engine.queue_callback)  # zi.at_backward_end
    engine = types.SimpleNamespace(zero_optimization_stage=lambda: 2)
    zi.check(engine)  # the installed version is inside the tested range
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    with pytest.raises(FisherdistError, match=r"deepspeed 0\.21\.0 is not supported"):
        zi.check(engine)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Sequential(nn.Linear(16, 5)))


def _fsdp1(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from fisherdist.fisher.backends import fsdp1_internals as fi

    model = _tiny()
    inner = FullyShardedDataParallel(model[2], use_orig_params=True, device_id=torch.device("cpu"))
    model[2] = inner
    root = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    units = fi.units(root)  # raises on any missing unit / FlatParameter attribute
    calls = []

    def hook(state, grad, output):
        calls.append((state, grad.numel(), output.numel()))
        from torch.distributed.algorithms._comm_hooks.default_hooks import DefaultState, reduce_scatter_hook

        reduce_scatter_hook(DefaultState(dist.group.WORLD), grad, output)

    states = {}
    for unit in units:
        states[id(unit)] = object()
        fi.set_unit_hook(unit, hook, states[id(unit)])
    root(torch.randn(4, 8)).sum().backward()
    layouts = [fi.flat_layout(u) for u in units]
    # each unit's hook got ITS state and its padded flat gradient; ranges agree with _shard_param_infos
    seen = {id(s): (g, o) for s, g, o in calls}
    ok_calls = all(id(states[id(u)]) in seen and seen[id(states[id(u)])] == (lay.padded_numel, lay.padded_numel // world)
                   for u, lay in zip(units, layouts))
    ok_ranges = all(lay.ranges(i, world)[rank] == lay.local_range(i) for lay in layouts for i in range(len(lay.params)))
    ok_views = all(p.numel() == lay.local_range(i)[1] for lay in layouts for i, p in enumerate(lay.params))
    return {"units": len(units), "calls": len(calls), "ok_calls": ok_calls, "ok_ranges": ok_ranges, "ok_views": ok_views,
            "shapes": sorted(s for lay in layouts for s in lay.shapes)}


def _fsdp2(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _tiny()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    group = model._get_fsdp_state()._fsdp_param_groups[0]
    fp = group.fsdp_params[0]
    return {
        "divide": isinstance(group.gradient_divide_factor, (float, type(None))),
        "force_sum": isinstance(group.force_sum_reduction_for_comms, bool),
        "sharded": isinstance(fp.sharded_param, nn.Parameter),
        "padded": math.prod(fp.padded_sharded_param_size) >= fp.sharded_param.to_local().numel(),
        "placement": fp.fsdp_placement.is_shard(0),
    }


def _zero(rank: int, world: int) -> dict:
    from deepspeed.utils import safe_get_local_grad

    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.fisher.backends import zero_internals as zi

    out = {}
    for stage in (1, 2, 3):
        w = wrap_model(_tiny(), f"zero{stage}", micro_batch_size=4)
        engine = w.module
        zi.check(engine)
        assert isinstance(zi.dp_group(engine), dist.ProcessGroup)
        params = list(w.unwrapped.parameters())
        fired: list[int] = []
        ended: list[int] = []

        def on_grad(p: torch.Tensor, fired: list[int] = fired, ended: list[int] = ended) -> None:
            """What the streaming hook relies on: every parameter fires, then the end-of-backward callback."""
            fired.append(id(p))
            if len(fired) == 1:
                zi.at_backward_end(lambda: ended.append(len(fired)))

        handles = [p.register_post_accumulate_grad_hook(on_grad) for p in params]
        engine.backward(engine(torch.randn(4, 8)).sum())
        for h in handles:
            h.remove()
        out[f"hooks{stage}"] = sorted(fired) == sorted(id(p) for p in params) and ended == [len(params)]
        if stage < 3:
            addrs = [zi.fragment_address(p) for p in params]
            frags = [zi.lp_grad_fragment(p) for p in params]
            out[stage] = all(isinstance(p._index_in_param_group, int) for p in params if p._hp_mapping is not None) and all(
                (a is None and f is None) or f.numel() == a[1] for a, f in zip(addrs, frags))
        else:
            for p in params:
                zi.check_zero3_chunks("p", p, world)
            out[stage] = all(tuple(p.ds_shape) and safe_get_local_grad(p).numel() == math.ceil(p.ds_numel / world)
                             for p in params)
        engine.step()
    return out


def _all(rank: int, world: int) -> dict:
    return {"fsdp1": _fsdp1(rank, world), "fsdp2": _fsdp2(rank, world), "zero": _zero(rank, world)}


def test_private_internals_on_live_instances():
    os.environ["DS_ACCELERATOR"] = "cpu"
    for r in run_distributed(_all, 2, timeout=180):
        f1 = r["fsdp1"]
        assert f1["units"] == 2 and f1["calls"] == 2, f1
        assert f1["ok_calls"] and f1["ok_ranges"] and f1["ok_views"], f1
        assert f1["shapes"] == sorted([(16, 8), (16,), (5, 16), (5,)])
        assert all(r["fsdp2"].values()), r["fsdp2"]
        assert r["zero"] == {1: True, 2: True, 3: True, "hooks1": True, "hooks2": True, "hooks3": True}
