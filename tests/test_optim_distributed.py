"""GaLore / Natural GaLore under FSDP2 (ragged row shards, one rank holding zero rows, same-shape matrices
batched) and DDP (whole-matrix owners) on 2-3 gloo ranks equal one process step for step; layer-wise mode
equals the normal step; state saved through DCP on 2 ranks loads on 3 and training continues identically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.distributed import run_distributed

STEPS = 7  # two projector refreshes (gap 3) and a partial period
CONFIGS: dict[str, dict[str, Any]] = {
    "galore": {"cls": "GaLoreAdamW", "kw": {}},
    "natural": {"cls": "NaturalGaLoreAdamW", "kw": {"history": 3, "damping": 0.05}},
    "natural_randomized": {"cls": "NaturalGaLoreAdamW",
                           "kw": {"history": 2, "subspace": "randomized", "power_iters": 1}},
}


class Twin(torch.nn.Module):
    """Two weights of one shape, a(x) + tanh(b(x)): the optimizer batches them (different gradients)."""

    def __init__(self, inputs: int, outputs: int, bias: bool) -> None:
        super().__init__()
        self.a = torch.nn.Linear(inputs, outputs, bias=bias)
        self.b = torch.nn.Linear(inputs, outputs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + torch.tanh(self.b(x))


def make_model() -> torch.nn.Sequential:
    """Two tall 11 x 5 (right projection, ragged rows), two wide 7 x 11 (left, uneven columns), a 2 x 7
    (a rank with no rows at 3 ranks) and a 1 x 2 (rank 1 low-rank gradient: a rank with no columns at 3)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(Twin(5, 11, bias=False), torch.nn.Tanh(), Twin(11, 7, bias=True),
                                torch.nn.Tanh(), torch.nn.Linear(7, 2, bias=False), torch.nn.Tanh(),
                                torch.nn.Linear(2, 1, bias=False))
    return model.double()


def make_optimizer(model: torch.nn.Module, name: str, **extra: Any) -> torch.optim.Optimizer:
    import fisherdist.optim as optim

    matrices = [p for n, p in model.named_parameters() if n.endswith("weight")]
    others = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    groups = [{"params": matrices, "rank": 2, "update_proj_gap": 3, "scale": 0.5}, {"params": others}]
    cfg = CONFIGS[name]
    return getattr(optim, cfg["cls"])(groups, lr=0.02, weight_decay=0.01, **cfg["kw"], **extra)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(7, 5, generator=gen, dtype=torch.float64),
            torch.randn(7, 1, generator=gen, dtype=torch.float64))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int) -> None:
    """Each rank takes its ragged slice of a 7-sample batch; the loss is scaled so that the backend's
    gradient average is the global mean over the 7 samples."""
    for t in steps:
        x, y = batch(t)
        xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        loss = 0.5 * ((model(xs) - ys) ** 2).sum() * world / x.shape[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def wrap(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    if backend == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2], model[4], model[6]):
        fully_shard(layer)
    fully_shard(model)
    return model


def reference(name: str, steps: int = STEPS, **extra: Any) -> dict[str, torch.Tensor]:
    model = make_model()
    train(model, make_optimizer(model, name, **extra), range(steps), 0, 1)
    return full_params(model)


def whole_state_bytes(name: str) -> int:
    model = make_model()
    opt = make_optimizer(model, name)
    train(model, opt, range(1), 0, 1)
    return sum(opt.state_bytes().values())  # type: ignore[attr-defined]


def _runs(rank: int, world: int, backend: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs = [(name, {}) for name in CONFIGS] + ([("natural", {"layerwise": True})] if backend == "fsdp2" else [])
    for name, extra in runs:
        model = wrap(make_model(), backend)
        opt = make_optimizer(model, name, **extra)
        train(model, opt, range(STEPS), rank, world)
        inner = model.module if backend == "ddp" else model
        label = name + ("_layerwise" if extra else "")
        out[label] = full_params(inner)
        out[label + "_state_bytes"] = opt.state_bytes()  # type: ignore[attr-defined]
        out[label + "_batched"] = max(len(key[1]) for key in opt._batches)  # type: ignore[attr-defined]
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-8, atol=1e-10, msg=key)


def test_layerwise_equals_normal_step_single_process() -> None:
    assert_same(reference("natural", layerwise=True), reference("natural"))
    assert_same(reference("natural_randomized", layerwise=True), reference("natural_randomized"))


def _save(rank: int, world: int, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = wrap(make_model(), "fsdp2")
    opt = make_optimizer(model, "natural")
    train(model, opt, range(4), rank, world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def _load_and_continue(rank: int, world: int, path: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = wrap(make_model(), "fsdp2")
    opt = make_optimizer(model, "natural")
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, range(4, STEPS), rank, world)
    return full_params(model)


def _two_ranks(rank: int, world: int, path: str) -> dict[str, Any]:
    out = {"ddp": _runs(rank, world, "ddp"), "fsdp2": _runs(rank, world, "fsdp2")}
    _save(rank, world, path)
    return out


def _three_ranks(rank: int, world: int, path: str) -> dict[str, Any]:
    return {"fsdp2": _runs(rank, world, "fsdp2"), "resumed": _load_and_continue(rank, world, path)}


def test_ddp_fsdp2_on_2_and_3_ranks_equal_one_process_and_state_reshards_2_to_3(tmp_path: Path) -> None:
    """DDP and FSDP2 on 2 ranks, FSDP2 on 3 (one rank with no rows of the 2 x 7 weight) and layer-wise
    FSDP2 equal one process; the Natural GaLore state written by 2 FSDP2 ranks after 4 steps, loaded by
    3, continues to the same parameters as an uninterrupted single-process run (two spawns, to keep the
    suite short)."""
    path = str(tmp_path / "ckpt")
    two = run_distributed(_two_ranks, 2, path, timeout=600)
    three = run_distributed(_three_ranks, 3, path, timeout=600)
    for name in CONFIGS:
        want, one_rank_bytes = reference(name), whole_state_bytes(name)
        for runs in [r["ddp"] for r in two] + [r["fsdp2"] for r in two + three]:
            assert_same(runs[name], want)
            # state is split, not copied: each rank holds less than one process's whole state
            assert sum(runs[name + "_state_bytes"].values()) < one_rank_bytes
    for runs in [r["fsdp2"] for r in two + three]:
        assert [runs[name + "_batched"] for name in CONFIGS] == [2] * len(CONFIGS)  # the twins: one batch
        assert_same(runs["natural_layerwise"], reference("natural"))
    for r in three:
        assert_same(r["resumed"], reference("natural"))
