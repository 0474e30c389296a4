"""A deterministic toy training run for the launcher / checkpoint / preemption tests.

``python -m tests._toy_train --out DIR --steps N [--backend fsdp2|ddp] [--ckpt-every K] [--signal-at S]``

Tiny float64 MLP, SGD with momentum, a global batch of 12 samples per step generated from
``step_seed(seed, step)`` and split across ranks (so any world size 1..4 sees the same data), and a
"Fisher-like" running sum of squared reduced gradients kept as DTensors under FSDP2 (sharded like the
parameters). Checkpoints go through :class:`RunCheckpointer`, stops through :class:`PreemptionHandler`.
At the end rank 0 writes ``DIR/result.pt``: full weights, full statistic, step and sample count.
``--signal-at S`` makes rank 0 send itself SIGUSR1 during step S (only one rank is signalled on purpose).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from fisherdist.distributed.checkpoint import ModelOptimizerState, RunCheckpointer, step_seed
from fisherdist.distributed.env import init_distributed, teardown
from fisherdist.distributed.preempt import PreemptionHandler
from tests.entry import finish, run_and_exit

GLOBAL_BATCH = 12


class SquaredGradSum(Stateful):
    """Running sum of squared gradients per parameter name (DTensor shards under FSDP2) plus a count."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        self.samples = 0

    def add(self, model: torch.nn.Module, samples: int) -> None:
        for n, p in model.named_parameters():
            self.sums[n] += p.grad.detach() ** 2
        self.samples += samples

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "samples": self.samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for n, t in state_dict["sums"].items():
            self.sums[n].copy_(t)
        self.samples = int(state_dict["samples"])


class Progress(Stateful):
    """Global position: next step; the data of step s depends only on s, so this is the loader position."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])


def build(backend: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()
    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    elif backend == "ddp":  # (any other value: a plain single-process model)
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def batch(seed: int, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step_seed(seed, step))
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--backend", default="fsdp2", choices=["fsdp2", "ddp", "plain"])
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--signal-at", type=int, default=-1)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step (to signal a running job)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    env = init_distributed(require_group=True)
    if GLOBAL_BATCH % env.world_size:
        raise SystemExit(f"world size {env.world_size} must divide {GLOBAL_BATCH}")
    model, opt = build(args.backend)
    stat, progress = SquaredGradSum(model), Progress()
    states = {"train": ModelOptimizerState(model, opt), "fisher": stat, "progress": progress}
    ckpt = RunCheckpointer(args.out / "ckpt", keep_last=args.keep_last)
    resumed_from = None
    if ckpt.latest() is not None:
        resumed_from = ckpt.load(states)["world_size"]
    log = args.out / f"log-rank{env.rank}.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pid-rank{env.rank}").write_text(str(os.getpid()))
    with PreemptionHandler() as pre, log.open("a") as logf:
        logf.write(json.dumps({"start": progress.step, "world": env.world_size, "resumed_from_world": resumed_from}) + "\n")
        while progress.step < args.steps:
            x, y = batch(args.seed, progress.step, env.rank, env.world_size)
            loss = ((model(x) - y) ** 2).sum() * env.world_size / GLOBAL_BATCH  # gradients are averaged over ranks
            loss.backward()
            stat.add(model, GLOBAL_BATCH)
            opt.step()
            opt.zero_grad()
            if progress.step == args.signal_at and env.rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(args.sleep)
            progress.step += 1
            logf.write(json.dumps({"done": progress.step}) + "\n")
            logf.flush()
            if pre.should_stop():
                ckpt.save(progress.step, states, backend=args.backend)
                code = pre.exit_code()
                teardown()
                return code
            if args.ckpt_every and progress.step % args.ckpt_every == 0:
                ckpt.save(progress.step, states, backend=args.backend)
    result = {"step": progress.step, "samples": stat.samples, "world": env.world_size,
              "weights": {n: full(t) for n, t in ModelOptimizerState(model).state_dict()["model"].items()},
              "fisher": {n: full(t) for n, t in stat.sums.items()}}  # fmt: skip
    return finish(result, args.out, env.rank)


if __name__ == "__main__":
    run_and_exit(main)
