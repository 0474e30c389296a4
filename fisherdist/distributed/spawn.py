"""Run a command on N local processes with no launcher line: ``fisherdist fisher ... dist.nproc=2``.

A command that is started plainly and asked for ``nproc > 1`` re-runs itself under torchrun's own
launcher API (standalone c10d rendezvous on a free localhost port), so the children look exactly like
``torchrun --standalone --nproc_per_node N -m fisherdist ...`` workers and :func:`init_distributed`
needs no special case. A failing child stops the others (no hang) and its exit status is returned with
one line from the launcher (a planned stop, exit 75, says how to resume). The workers die with the
launcher (:func:`die_with_parent`) and run under its ``run_lock``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from fisherdist.distributed.env import MPI_SIZE_VARS, detect_launcher
from fisherdist.distributed.preempt import PREEMPTED_EXIT
from fisherdist.distributed.runlock import SPAWN_PARENT_ENV

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


@contextmanager
def _spawn_environment(nproc: int) -> Iterator[None]:
    """What the workers inherit for the launch: our PID (they die with us, and run under our lock) and,
    like torchrun, one thread budget per worker. torch's elastic agent logs every worker exit and
    termination as warnings; we report the outcome ourselves in one line, so it is quietened."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", SPAWN_PARENT_ENV)}
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[SPAWN_PARENT_ENV] = str(os.getpid())
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        elastic.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _failure_line(rank: int, exitcode: int, signal_name: str, nproc: int) -> tuple[str, int]:
    """The launcher's one line for a failed launch, and its exit status."""
    if exitcode == PREEMPTED_EXIT:
        return ("fisherdist: stopped early on request (SIGTERM/SIGUSR1) after writing a checkpoint; run the same "
                "command again to resume", PREEMPTED_EXIT)
    if exitcode < 0:
        return (f"fisherdist: error: local rank {rank} of {nproc} was killed by {signal_name}; the other ranks "
                "were stopped", 1)
    return (f"fisherdist: error: local rank {rank} of {nproc} failed (exit status {exitcode}); its message is "
            "above", exitcode)


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
    try:
        with _spawn_environment(nproc):
            elastic_launch(config, entrypoint=sys.executable)("-m", module, *argv)
    except ChildFailedError as e:
        failures = e.failures.values()
        planned = [f for f in failures if f.exitcode == PREEMPTED_EXIT]
        rank, failure = (0, planned[0]) if planned else e.get_first_failure()
        line, code = _failure_line(rank, failure.exitcode, failure.signal_name(), nproc)
        print(line, file=sys.stderr)
        return code
    except SignalException as e:  # Ctrl-C / scancel: the agent has already stopped the workers
        print(f"fisherdist: stopped by {e.sigval.name}; all {nproc} local ranks stopped (a planned stop leaves a "
              "checkpoint: run the same command again to resume)", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


def die_with_parent() -> None:
    """In a ``dist.nproc`` worker: get SIGKILL when the launcher dies (Linux ``PR_SET_PDEATHSIG``), so a
    killed launcher leaves no orphans writing into ``out``; exit now if it is already gone."""
    parent = os.environ.get(SPAWN_PARENT_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    libc: Any = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(parent):  # the launcher died before prctl took effect
        os._exit(1)


def maybe_spawn(nproc: int, argv: list[str], module: str = "fisherdist") -> int | None:
    """Spawn when asked for ``nproc > 1`` outside a launcher and return the exit status; else ``None``
    (this process should just run). Call it after validating the config, so bad input fails once."""
    if nproc <= 1 or in_launched_env():
        die_with_parent()
        return None
    return spawn_self(nproc, argv, module)
