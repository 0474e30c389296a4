"""A command for the launcher / fault tests, run through the real CLI ``main``: ``python -m tests._spawn_probe
spawnprobe MODE OUT [--nproc N] [--timeout S]``. It spawns like every command (``maybe_spawn``), holds
``run_lock(OUT)``, and each worker joins the process group, then:

* ``sleep``: writes ``OUT/pid-<rank>`` and sleeps (the launcher is killed from outside);
* ``kill-peer``: rank 1 SIGKILLs itself after the group formed, rank 0 waits in a barrier;
* ``preempt``: every rank returns the planned-stop status 75;
* ``join``: no spawn (the test sets RANK/WORLD_SIZE for a rank whose peers never come).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def _worker(mode: str, out: Path, timeout: float) -> int:
    import torch.distributed as dist

    from fisherdist.distributed.env import init_distributed

    env = init_distributed(require_group=True, timeout_s=timeout)
    if mode == "sleep":
        (out / f"pid-{env.rank}").write_text(str(os.getpid()))
        time.sleep(300)
    if mode == "kill-peer":
        dist.barrier()
        if env.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
    return 75 if mode == "preempt" else 0


def _run(args: argparse.Namespace) -> int:
    from fisherdist.distributed.runlock import run_lock
    from fisherdist.distributed.spawn import maybe_spawn

    out = Path(args.out)
    with run_lock(out):
        argv = ["spawnprobe", args.mode, args.out, "--timeout", str(args.timeout)]
        code = maybe_spawn(args.nproc, argv, module="tests._spawn_probe")
        return code if code is not None else _worker(args.mode, out, args.timeout)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spawnprobe", help="test-only command")
    p.add_argument("mode", choices=["sleep", "kill-peer", "preempt", "join"])
    p.add_argument("out")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=_run)


if __name__ == "__main__":
    from fisherdist import cli

    cli.COMMAND_MODULES = [*cli.COMMAND_MODULES, sys.modules[__name__]]
    sys.exit(cli.main(sys.argv[1:]))
