"""Entry point for launcher tests: ``python -m tests._dist_entry --out DIR [--nproc N] [--fail-rank R]``.

Goes through the same path as a real command (``maybe_spawn`` then ``init_distributed``), all-reduces
``rank + 1`` in float64 and writes what this rank saw to ``DIR/rank<R>.json`` for the test to check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fisherdist.distributed.env import init_distributed, teardown
from fisherdist.distributed.spawn import maybe_spawn


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--fail-rank", type=int, default=-1)
    args = parser.parse_args(argv)
    code = maybe_spawn(args.nproc, argv, module="tests._dist_entry")
    if code is not None:
        return code
    if os.environ.get("RANK") == str(args.fail_rank):
        print(f"rank {args.fail_rank}: failing on purpose", file=sys.stderr, flush=True)
        return 3  # the other ranks are left waiting for it in the rendezvous: the launcher must stop them
    env = init_distributed(require_group=True)
    value = torch.tensor([env.rank + 1.0], dtype=torch.float64)
    dist.all_reduce(value)
    report = {
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "local_world_size": env.local_world_size,
        "launcher": env.launcher,
        "backend": env.backend,
        "master_addr": env.master_addr,
        "master_port": env.master_port,
        "sum": value.item(),
        "same_env_again": init_distributed() is env,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{env.rank}.json").write_text(json.dumps(report))
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
