"""Bring up ``torch.distributed`` from whatever started this process: torchrun / the DeepSpeed launcher,
a Slurm ``srun`` task, ``mpiexec`` (via mpi4py), or nothing at all.

Commands call :func:`init_distributed` and never read launcher variables themselves. A mistake in those
variables becomes one :class:`FisherdistError` line naming the variable and its value, instead of a
rendezvous that hangs until a timeout.

Precedence (first match wins):

1. ``RANK`` set -> torchrun (also the DeepSpeed launcher, and torchrun started *inside* ``srun``);
2. an ``srun`` task (``SLURM_PROCID`` and ``SLURM_STEP_ID``; a batch script itself has no step id and is
   not a launch), unless MPI variables disagree with it (``mpiexec`` run inside an allocation);
3. MPI variables (``PMI_RANK``, ``OMPI_COMM_WORLD_RANK``, ...) -> ranks from ``mpi4py.MPI.COMM_WORLD``;
4. nothing -> one process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from fisherdist.distributed.hostlist import head_node, tasks_per_node
from fisherdist.errors import FisherdistError

Launcher = Literal["single", "torchrun", "slurm", "mpi"]
BACKEND_ENV = "FISHERDIST_DIST_BACKEND"
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
SLURM_PORT_BASE = 20000
TIMEOUT_ENV = "FISHERDIST_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job and how its process group was (or would be) set up."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: Launcher
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current: DistEnv | None = None
_owns_group = False


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; the race is accepted, as torchrun does)."""
    with socket.socket() as s:
        s.bind(("", 0))
        port: int = s.getsockname()[1]
        return port


def _int(env: Mapping[str, str], name: str, default: int | None = None, minimum: int = 0) -> int:
    raw = env.get(name, "")
    if raw == "":
        if default is None:
            raise FisherdistError(f"environment variable {name} is not set")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise FisherdistError(f"environment variable {name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise FisherdistError(f"environment variable {name}={raw!r}: expected an integer >= {minimum}")
    return value


def _check_below(env: Mapping[str, str], name: str, value: int, bound: int, what: str) -> None:
    if value >= bound:
        raise FisherdistError(f"environment variable {name}={env.get(name)}: must be below {what}")


def _port(env: Mapping[str, str], default: int | None = None) -> int:
    port = _int(env, "MASTER_PORT", default, 1)
    if port > 65535:
        raise FisherdistError(f"environment variable MASTER_PORT={port}: expected a TCP port (1-65535)")
    return port


def _master(env: Mapping[str, str], world: int) -> tuple[str, int]:
    if world == 1 and not env.get("MASTER_ADDR"):
        return "127.0.0.1", _port(env, free_port())
    if not env.get("MASTER_ADDR"):
        raise FisherdistError(f"environment variable MASTER_ADDR is not set (WORLD_SIZE={world})")
    return env["MASTER_ADDR"], _port(env)


# ---- detection --------------------------------------------------------------------------------------


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if env.get(n, "") != ""), None)


def _mpi_disagrees_with_slurm(env: Mapping[str, str]) -> bool:
    """mpiexec inside an allocation inherits SLURM_* of the job or of its proxy step; its ranks differ."""
    rank_var, size_var = _first(env, MPI_RANK_VARS), _first(env, MPI_SIZE_VARS)
    if rank_var is None:
        return False
    same_rank = env[rank_var] == env.get("SLURM_PROCID")
    return not same_rank or (size_var is not None and env[size_var] != env.get("SLURM_NTASKS"))


def detect_launcher(env: Mapping[str, str] | None = None) -> Launcher:
    """Which launcher started this process (see the module docstring for the precedence)."""
    env = os.environ if env is None else env
    if env.get("RANK", "") != "":
        return "torchrun"
    in_srun = env.get("SLURM_PROCID", "") != "" and env.get("SLURM_STEP_ID", "") != ""
    launcher: Launcher = "single"
    if in_srun and not _mpi_disagrees_with_slurm(env):
        launcher = "slurm"
    elif _first(env, MPI_RANK_VARS) is not None:
        launcher = "mpi"
    if env.get("WORLD_SIZE", "") != "":
        if launcher == "single":
            raise FisherdistError(f"environment variable WORLD_SIZE={env['WORLD_SIZE']} is set but RANK is not")
        if launcher == "slurm" and _int(env, "WORLD_SIZE", minimum=1) != _int(env, "SLURM_NTASKS", minimum=1):
            raise FisherdistError(
                f"environment variable WORLD_SIZE={env['WORLD_SIZE']} disagrees with SLURM_NTASKS={env['SLURM_NTASKS']}"
            )
    return launcher


@dataclass(frozen=True)
class _Topology:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _torchrun_topology(env: Mapping[str, str]) -> _Topology:
    rank = _int(env, "RANK")
    if env.get("WORLD_SIZE", "") == "":
        raise FisherdistError(f"environment variable RANK={rank} is set but WORLD_SIZE is not")
    world = _int(env, "WORLD_SIZE", minimum=1)
    _check_below(env, "RANK", rank, world, f"WORLD_SIZE={world}")
    local_world = _int(env, "LOCAL_WORLD_SIZE", world, 1)  # absent: one node, as when RANK is set by hand
    local_rank = _int(env, "LOCAL_RANK", rank % local_world)
    _check_below(env, "LOCAL_RANK", local_rank, local_world, f"LOCAL_WORLD_SIZE={local_world}")
    return _Topology(rank, world, local_rank, local_world, *_master(env, world))


def _slurm_topology(env: Mapping[str, str]) -> _Topology:
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS", minimum=1)
    _check_below(env, "SLURM_PROCID", rank, world, f"SLURM_NTASKS={world}")
    per_node_var = _first(env, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    local_world = world
    if per_node_var is not None:
        counts, node = tasks_per_node(env[per_node_var]), _int(env, "SLURM_NODEID", 0)
        _check_below(env, "SLURM_NODEID", node, len(counts), f"the {len(counts)} node(s) of {per_node_var}={env[per_node_var]}")
        local_world = counts[node]
    local_rank = _int(env, "SLURM_LOCALID")
    _check_below(env, "SLURM_LOCALID", local_rank, local_world, f"the {local_world} task(s) on this node")
    addr = env.get("MASTER_ADDR", "")
    if not addr:
        list_var = _first(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
        if list_var is None:
            raise FisherdistError("environment variable SLURM_JOB_NODELIST is not set (needed for MASTER_ADDR)")
        addr = head_node(env[list_var])
    if env.get("MASTER_PORT", ""):
        port = _port(env)
    else:  # every task derives the same port without talking to the others
        port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_BASE
    return _Topology(rank, world, local_rank, local_world, addr, port)


def _mpi_topology(env: Mapping[str, str]) -> _Topology:
    rank_var = _first(env, MPI_RANK_VARS) or MPI_RANK_VARS[0]
    try:
        from mpi4py import MPI
    except ImportError:
        raise FisherdistError(f"started by an MPI launcher ({rank_var}={env.get(rank_var)}) but mpi4py is not installed") from None
    comm = MPI.COMM_WORLD
    size_var = _first(env, MPI_SIZE_VARS)
    if size_var is not None and _int(env, size_var, minimum=1) != comm.Get_size():
        raise FisherdistError(
            f"environment variable {size_var}={env[size_var]} but mpi4py sees {comm.Get_size()} process(es): "
            "mpi4py is built against another MPI than the mpiexec that started it"
        )
    if env.get("WORLD_SIZE", "") and _int(env, "WORLD_SIZE", minimum=1) != comm.Get_size():
        raise FisherdistError(f"environment variable WORLD_SIZE={env['WORLD_SIZE']} disagrees with MPI size {comm.Get_size()}")
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_world = node.Get_rank(), node.Get_size()
    node.Free()
    master = None
    if comm.Get_rank() == 0:  # rank 0 hosts the TCP store; everyone learns where from one broadcast
        single_node = local_world == comm.Get_size()
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if single_node else socket.gethostname())
        master = (addr, _port(env, free_port()))
    addr, port = comm.bcast(master, root=0)
    return _Topology(comm.Get_rank(), comm.Get_size(), local_rank, local_world, addr, port)


def _backend_and_device(local_rank: int) -> tuple[str, torch.device]:
    cuda = torch.cuda.is_available()
    backend = os.environ.get(BACKEND_ENV, "") or ("nccl" if cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise FisherdistError(f"environment variable {BACKEND_ENV}={backend!r}: expected 'gloo' or 'nccl'")
    if backend == "nccl" and not cuda:
        raise FisherdistError(f"environment variable {BACKEND_ENV}=nccl but CUDA is not available")
    if not cuda:
        return backend, torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())  # one visible GPU per task works too
    torch.cuda.set_device(device)
    return backend, device


def _from_existing_group() -> DistEnv:
    """Someone else (DeepSpeed, a test harness) initialised the group: describe it, do not redo it."""
    env = os.environ
    rank, world = dist.get_rank(), dist.get_world_size()
    launcher = detect_launcher()
    local_world = _int(env, "LOCAL_WORLD_SIZE", world, 1)
    local_rank = _int(env, "LOCAL_RANK", rank % local_world)
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    addr, port = env.get("MASTER_ADDR", ""), _int(env, "MASTER_PORT", 0)
    return DistEnv(rank, world, local_rank, local_world, addr, port, launcher, device, str(dist.get_backend()))


_TOPOLOGY = {"torchrun": _torchrun_topology, "slurm": _slurm_topology, "mpi": _mpi_topology}


def _timeout(timeout_s: float | None = None) -> timedelta:
    """How long a rank waits for its peers, at start-up and in any collective: a rank that dies outside
    torchrun (srun, mpiexec) must not leave the others blocked for gloo's default 30 minutes.
    ``timeout_s`` (``dist.timeout_s``), else ``FISHERDIST_DIST_TIMEOUT_S``, else 600 s."""
    if timeout_s is not None:
        return timedelta(seconds=timeout_s)
    return timedelta(seconds=_int(os.environ, TIMEOUT_ENV, default=600, minimum=1))


def init_distributed(require_group: bool = False, timeout_s: float | None = None) -> DistEnv:
    """Initialise ``torch.distributed`` for this launcher (idempotent) and return where this rank sits.

    A single process gets a 1-rank gloo/NCCL group only when ``require_group`` (code that always calls
    collectives); otherwise no group is created. The chosen topology is exported as RANK / WORLD_SIZE /
    LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT (except for a lone process, whose children
    must not inherit a RANK) so env:// and DeepSpeed agree with it. Ranks that do not arrive within the
    timeout are named in one :class:`~fisherdist.distributed.failures.PeerFailure` (see ``rendezvous.py``).
    """
    global _current, _owns_group
    if _current is not None and (dist.is_initialized() or not require_group):
        return _current
    if dist.is_initialized():
        _current = _from_existing_group()
        return _current
    launcher = detect_launcher()
    if launcher == "single":
        topo = _Topology(0, 1, 0, 1, "127.0.0.1", free_port() if require_group else 0)
    else:
        topo = _TOPOLOGY[launcher](os.environ)
    backend, device = _backend_and_device(topo.local_rank)
    env = DistEnv(**vars(topo), launcher=launcher, device=device, backend=backend)
    if launcher != "single":
        os.environ.update(
            RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
            LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
        )  # fmt: skip
    if launcher != "single" or require_group:  # a lone process keeps os.environ clean: no RANK leaks to children
        from fisherdist.distributed.rendezvous import join

        timeout = _timeout(timeout_s)
        dist.init_process_group(
            backend, store=join(env, timeout), rank=env.rank, world_size=env.world_size,
            device_id=device if backend == "nccl" else None, timeout=timeout,
        )  # fmt: skip
        _owns_group = True
    _current = env
    return env


def teardown() -> None:
    """Destroy the process group this module created (not one someone else owns) and forget the env."""
    global _current, _owns_group
    if _owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _current, _owns_group = None, False


__all__ = ["DistEnv", "detect_launcher", "free_port", "init_distributed", "teardown"]
