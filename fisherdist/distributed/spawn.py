"""Run a command on N local processes with no launcher line: ``fisherdist fisher ... dist.nproc=2``.

A command that is started plainly and asked for ``nproc > 1`` re-runs itself under torchrun's own
launcher API (standalone c10d rendezvous on a free localhost port), so the children look exactly like
``torchrun --standalone --nproc_per_node N -m fisherdist ...`` workers and :func:`init_distributed`
needs no special case. A failing child stops the others (no hang) and its exit status is returned.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping

from fisherdist.distributed.env import MPI_SIZE_VARS, detect_launcher


def in_launched_env(env: Mapping[str, str] | None = None) -> bool:
    """True when a launcher already started several processes (or torchrun started this one).

    ``srun -n 1`` / ``mpiexec -n 1`` count as not launched, so ``dist.nproc`` still spawns there.
    """
    env = os.environ if env is None else env
    launcher = detect_launcher(env)
    if launcher == "torchrun":
        return True
    if launcher == "slurm":
        return int(env["SLURM_NTASKS"]) > 1
    if launcher == "mpi":
        size = next((env[n] for n in MPI_SIZE_VARS if env.get(n, "")), "")
        return not size.isdigit() or int(size) > 1  # PMIx exports no size: assume a real launch
    return False


def spawn_self(nproc: int, argv: list[str], module: str = "fisherdist") -> int:
    """Run ``python -m <module> <argv>`` on ``nproc`` local ranks; return 0 or the failing rank's status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"fisherdist-{uuid.uuid4()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # port 0: the store binds a free port itself (torchrun --standalone)
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    # Like torchrun: N workers must not each start one thread per core.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", module, *argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
        print(f"fisherdist: error: local rank {rank} of {nproc} failed ({how}); see its output above", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as e:  # Ctrl-C / scancel: the agent has already stopped the workers
        print(f"fisherdist: error: interrupted by {e.sigval.name}; all {nproc} local ranks stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0


def maybe_spawn(nproc: int, argv: list[str], module: str = "fisherdist") -> int | None:
    """Spawn when asked for ``nproc > 1`` outside a launcher and return the exit status; else ``None``
    (this process should just run). Call it after validating the config, so bad input fails once."""
    if nproc <= 1 or in_launched_env():
        return None
    return spawn_self(nproc, argv, module)
