"""Process-group set-up from each launcher, its error messages, Slurm host lists and self-spawning.

Launcher tests run ``tests/_dist_entry.py`` in real subprocesses (torchrun, Slurm-style variables,
mpiexec, self-spawn); every rank all-reduces ``rank + 1`` and the sum is checked against the brute-force
sum over ranks. In-process tests cover the one-line errors, which fire before any rendezvous.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fisherdist.distributed import env as denv
from fisherdist.distributed.hostlist import expand_nodelist, tasks_per_node
from fisherdist.distributed.spawn import in_launched_env, maybe_spawn
from fisherdist.errors import FisherdistError
from tests.distributed import run_distributed

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120
LAUNCH_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "MV2_", "MPI_LOCAL", "TORCHELASTIC_")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", denv.BACKEND_ENV)  # fmt: skip


def _is_launch_var(name: str) -> bool:
    return name in LAUNCH_VARS or name.startswith(LAUNCH_PREFIXES)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _is_launch_var(k)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _entry(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tests._dist_entry", "--out", str(out), *args]


def _reports(out: Path, world: int, launcher: str) -> list[dict]:
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    expected_sum = float(sum(r + 1 for r in range(world)))
    for r, rep in enumerate(reports):
        assert (rep["rank"], rep["world_size"], rep["launcher"]) == (r, world, launcher)
        assert rep["sum"] == expected_sum and rep["backend"] == "gloo" and rep["same_env_again"]
    assert len({(rep["master_addr"], rep["master_port"]) for rep in reports}) == 1
    return reports


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


# ---- launchers in real subprocesses -----------------------------------------------------------------


def test_torchrun_inside_srun_wins(tmp_path: Path) -> None:
    slurm = dict(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_STEP_ID="0",
                 SLURM_JOB_ID="5", SLURM_JOB_NODELIST="localhost")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests._dist_entry", "--out", str(tmp_path)]  # fmt: skip
    _run(cmd, _clean_env(**slurm))
    reports = _reports(tmp_path, 2, "torchrun")
    assert [r["local_rank"] for r in reports] == [0, 1]


def _free_port_in_slurm_range() -> int:
    for _ in range(200):
        port = random.randrange(denv.SLURM_PORT_BASE, 2 * denv.SLURM_PORT_BASE)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise AssertionError("no free port in the Slurm-derived range")


def test_srun_style_tasks_without_rank(tmp_path: Path) -> None:
    port = _free_port_in_slurm_range()
    job_id = port - denv.SLURM_PORT_BASE + 3 * denv.SLURM_PORT_BASE  # the modulo must bring it back
    procs = []
    for rank in range(2):
        env = _clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                         SLURM_STEP_ID="0", SLURM_TASKS_PER_NODE="2", SLURM_JOB_ID=str(job_id),
                         SLURM_JOB_NODELIST="localhost,gpu[02-03]")  # fmt: skip
        procs.append(subprocess.Popen(_entry(tmp_path), env=env, cwd=REPO, stderr=subprocess.PIPE, text=True))
    try:
        errors = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errors
    reports = _reports(tmp_path, 2, "slurm")
    assert {(r["master_addr"], r["master_port"], r["local_world_size"]) for r in reports} == {("localhost", port, 2)}


def _mpiexec() -> str:
    path = Path(sys.executable).parent / "mpiexec"
    if not path.exists():
        pytest.skip(f"no mpiexec next to {sys.executable} (pip install mpich)")
    return str(path)


@pytest.mark.mpi
def test_mpiexec_two_ranks(tmp_path: Path) -> None:
    _run([_mpiexec(), "-n", "2", *_entry(tmp_path)], _clean_env())
    reports = _reports(tmp_path, 2, "mpi")
    assert [(r["local_rank"], r["local_world_size"]) for r in reports] == [(0, 2), (1, 2)]


def test_spawn_self_runs_two_ranks(tmp_path: Path) -> None:
    _run(_entry(tmp_path, "--nproc", "2"), _clean_env())
    _reports(tmp_path, 2, "torchrun")


def test_spawn_self_failing_child_stops_everyone(tmp_path: Path) -> None:
    # Rank 1 exits before the rendezvous completes; rank 0 would wait there for 30 minutes on its own.
    proc = subprocess.run(_entry(tmp_path, "--nproc", "2", "--fail-rank", "1"), env=_clean_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "fisherdist: error: local rank 1 of 2 failed (exit status 3)" in proc.stderr
    assert not list(tmp_path.glob("rank*.json"))


def _group_probe(rank: int, world: int) -> tuple[int, int, str, bool]:
    env = denv.init_distributed()  # the harness already initialised the group: describe it, don't redo it
    return env.rank, env.world_size, env.launcher, denv.init_distributed() is env


def test_existing_group_is_described_not_reinitialised() -> None:
    assert run_distributed(_group_probe, 2, timeout=TIMEOUT) == [(0, 2, "torchrun", True), (1, 2, "torchrun", True)]


# ---- in-process: detection, errors, idempotence ------------------------------------------------------


@pytest.fixture
def launch_env(monkeypatch: pytest.MonkeyPatch):
    """A process with no launcher variables; whatever the test initialises is torn down."""
    for name in list(os.environ):
        if _is_launch_var(name):
            monkeypatch.delenv(name)
    yield monkeypatch
    denv.teardown()
    assert not dist.is_initialized()


SRUN = dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_STEP_ID="0", SLURM_JOB_ID="9",
            SLURM_JOB_NODELIST="n[1-2]")  # fmt: skip
TORCHRUN = dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
BAD_ENVS = [
    (dict(RANK="2", WORLD_SIZE="2"), "RANK=2: must be below WORLD_SIZE=2"),
    (dict(WORLD_SIZE="2"), "WORLD_SIZE=2 is set but RANK is not"),
    (dict(RANK="0"), "RANK=0 is set but WORLD_SIZE is not"),
    (dict(RANK="one", WORLD_SIZE="2"), "RANK='one': expected an integer"),
    (dict(RANK="-1", WORLD_SIZE="2"), "RANK='-1': expected an integer >= 0"),
    (dict(TORCHRUN, LOCAL_RANK="2", LOCAL_WORLD_SIZE="2"), "LOCAL_RANK=2: must be below LOCAL_WORLD_SIZE=2"),
    (dict(RANK="0", WORLD_SIZE="2", MASTER_PORT="1"), "MASTER_ADDR is not set (WORLD_SIZE=2)"),
    (dict(TORCHRUN, MASTER_PORT="abc"), "MASTER_PORT='abc': expected an integer"),
    (dict(TORCHRUN, MASTER_PORT="70000"), "MASTER_PORT=70000: expected a TCP port (1-65535)"),
    (dict(SRUN, WORLD_SIZE="4"), "WORLD_SIZE=4 disagrees with SLURM_NTASKS=2"),
    (dict(SRUN, SLURM_PROCID="3"), "SLURM_PROCID=3: must be below SLURM_NTASKS=2"),
    (dict(SRUN, SLURM_NTASKS="two"), "SLURM_NTASKS='two': expected an integer"),
    (dict(SRUN, SLURM_LOCALID=""), "SLURM_LOCALID is not set"),
    (dict(SRUN, SLURM_JOB_ID=""), "SLURM_JOB_ID is not set"),
    (dict(SRUN, SLURM_JOB_NODELIST=""), "SLURM_JOB_NODELIST is not set"),
    (dict(SRUN, SLURM_TASKS_PER_NODE="2x"), "tasks per node '2x'"),
    (dict(SRUN, SLURM_TASKS_PER_NODE="1,1", SLURM_NODEID="2"), "SLURM_NODEID=2: must be below the 2 node(s)"),
    ({denv.BACKEND_ENV: "mpi"}, f"{denv.BACKEND_ENV}='mpi': expected 'gloo' or 'nccl'"),
]
if not torch.cuda.is_available():
    BAD_ENVS.append(({denv.BACKEND_ENV: "nccl"}, f"{denv.BACKEND_ENV}=nccl but CUDA is not available"))


@pytest.mark.parametrize("bad, message", BAD_ENVS, ids=[m for _, m in BAD_ENVS])
def test_inconsistent_variables_give_one_line(launch_env: pytest.MonkeyPatch, bad: dict, message: str) -> None:
    for k, v in bad.items():
        launch_env.setenv(k, v)
    with pytest.raises(FisherdistError) as err:
        denv.init_distributed(require_group=True)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "env, launcher",
    [
        ({}, "single"),
        (dict(SRUN, SLURM_STEP_ID=""), "single"),  # the batch script itself: SLURM_PROCID=0 but no step
        (SRUN, "slurm"),
        (dict(SRUN, PMI_RANK="0", PMI_SIZE="2"), "slurm"),  # srun --mpi=pmi2: both agree
        (dict(SRUN, PMI_RANK="1", PMI_SIZE="2", SLURM_NTASKS="1"), "mpi"),  # mpiexec inside an allocation
        (dict(PMI_RANK="1", PMI_SIZE="2"), "mpi"),
        (dict(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="4"), "mpi"),
        (dict(SRUN, RANK="3", WORLD_SIZE="8"), "torchrun"),  # torchrun started by srun
    ],
)
def test_detect_launcher(env: dict, launcher: str) -> None:
    assert denv.detect_launcher(env) == launcher


@pytest.mark.parametrize(
    "env, launched",
    [({}, False), (dict(RANK="0", WORLD_SIZE="1"), True), (dict(SRUN, SLURM_NTASKS="1"), False),
     (SRUN, True), (dict(PMI_RANK="0", PMI_SIZE="1"), False), (dict(PMI_RANK="0", PMI_SIZE="2"), True),
     (dict(SRUN, SLURM_STEP_ID=""), False)],  # fmt: skip
)
def test_in_launched_env(env: dict, launched: bool) -> None:
    assert in_launched_env(env) is launched


def test_maybe_spawn_runs_in_place_when_launched(launch_env: pytest.MonkeyPatch) -> None:
    assert maybe_spawn(1, ["x"]) is None
    for k, v in TORCHRUN.items():
        launch_env.setenv(k, v)
    assert maybe_spawn(4, ["x"]) is None


def test_slurm_topology_multi_node() -> None:
    env = dict(SRUN, SLURM_PROCID="4", SLURM_NTASKS="5", SLURM_NODEID="2", SLURM_LOCALID="0",
               SLURM_TASKS_PER_NODE="2(x2),1", SLURM_JOB_ID="45678", SLURM_JOB_NODELIST="gpu[07-09]")  # fmt: skip
    topo = denv._slurm_topology(env)
    assert (topo.rank, topo.world_size, topo.local_rank, topo.local_world_size) == (4, 5, 0, 1)
    assert topo.master_port == 25678  # 20000 + 45678 % 20000
    assert topo.master_addr == "gpu07"
    assert denv._slurm_topology(dict(env, MASTER_ADDR="h", MASTER_PORT="1234")).master_port == 1234


def test_single_process_group_is_idempotent(launch_env: pytest.MonkeyPatch) -> None:
    plain = denv.init_distributed()
    assert (plain.launcher, plain.world_size) == ("single", 1) and not dist.is_initialized()
    env = denv.init_distributed(require_group=True)
    assert dist.is_initialized() and dist.get_world_size() == 1 and denv.init_distributed() is env
    t = torch.tensor([2.5], dtype=torch.float64)
    dist.all_reduce(t)
    assert t.item() == 2.5 and "RANK" not in os.environ  # a lone process leaks no RANK to its children
    denv.teardown()
    assert not dist.is_initialized()


# ---- Slurm host lists ---------------------------------------------------------------------------------

HOSTLISTS = {  # expectations written by hand (and matched by `scontrol show hostnames` 22.05)
    "node[01-04],gpu7": ["node01", "node02", "node03", "node04", "gpu7"],
    "a[1-2,5]-ib[3-4],b": ["a1-ib3", "a1-ib4", "a2-ib3", "a2-ib4", "a5-ib3", "a5-ib4", "b"],
    "x": ["x"],
    "n[9-11]": ["n9", "n10", "n11"],
    "n[08-10]": ["n08", "n09", "n10"],
    "a,b[1,3]": ["a", "b1", "b3"],
    "localhost": ["localhost"],
}


@pytest.mark.parametrize("nodelist", HOSTLISTS)
def test_expand_nodelist(nodelist: str) -> None:
    assert expand_nodelist(nodelist) == HOSTLISTS[nodelist]


@pytest.mark.parametrize("bad", ["node[01-04", "n[a-b]", "n]1["])
def test_bad_nodelist(bad: str) -> None:
    with pytest.raises(FisherdistError, match="node list"):
        expand_nodelist(bad)


def test_tasks_per_node() -> None:
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1] and tasks_per_node("8") == [8]


def _random_nodelist(rng: random.Random) -> str:
    def ranges() -> str:
        parts = []
        for _ in range(rng.randint(1, 3)):
            lo, width = rng.randint(0, 12), rng.choice([1, 2, 3])
            hi = lo + rng.randint(0, 3)
            parts.append(f"{lo:0{width}d}-{hi:0{width}d}" if rng.random() < 0.6 else f"{lo:0{width}d}")
        return ",".join(parts)

    items = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(["n", "gpu", "rack"]) + f"[{ranges()}]"
        items.append(name + (f"-ib[{ranges()}]" if rng.random() < 0.3 else "") if rng.random() < 0.8 else "login")
    return ",".join(items)


def test_expand_nodelist_matches_scontrol(tmp_path: Path) -> None:
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol not installed (apt-get install slurm-client)")
    conf = tmp_path / "slurm.conf"  # scontrol wants a config to start, even for pure host-list work
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=ALL\n")
    rng = random.Random(0)
    lists = [_random_nodelist(rng) for _ in range(25)]
    for nodelist in lists:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=dict(os.environ, SLURM_CONF=str(conf)),
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert expand_nodelist(nodelist) == out.stdout.split(), nodelist

