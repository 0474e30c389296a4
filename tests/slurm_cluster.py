"""A private single-node Slurm 22.05 cluster (slurmctld + slurmd + munge) for the launcher tests.

Follows ``local-slurm.md``: all state in one temporary directory, its own munge key and socket, free ports
(or ``FISHERDIST_SLURM_PORT`` and the next one), no cgroups, accounting off, one node with 2 CPUs. Daemons are
stopped by their recorded pids (``scontrol shutdown``, then munged), never by name.

Use the session-scoped ``slurm`` fixture (import it into a test module: ``from tests.slurm_cluster import
slurm``). Without the binaries the tests skip with the reason; in CI (``CI=true``) that skip is a failure
(see ``tests/conftest.py``) because CI installs them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_all

BINARIES = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel", "slurmctld", "slurmd", "munged")
SBIN = ("/usr/sbin", "/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _conf(d: Path, cpus: int, port: int) -> str:
    return f"""ClusterName=fdci
SlurmctldHost=localhost
SlurmctldPort={port}
SlurmdPort={port + 1}
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """A running private cluster; ``env`` is os.environ plus ``SLURM_CONF`` for client commands."""

    dir: Path
    env: dict[str, str]

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job, "-o", check=False).stdout
        field = next((f for f in out.split() if f.startswith("JobState=")), "JobState=UNKNOWN")
        return field.split("=", 1)[1]

    def wait_job(self, job: str, timeout: float, done: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> str:
        """Poll until the job reaches a final state; on timeout cancel it and fail with its logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state in done:
                return state
            time.sleep(0.5)
        self.run("scancel", job, check=False)
        raise TimeoutError(f"Slurm job {job} still {self.job_state(job)} after {timeout} s\n{self.logs()}")

    def release_requeued(self, job: str, timeout: float, context: str = "") -> None:
        """Wait for ``job``'s requeue, then start it at once instead of after Slurm's ~120 s hold: only once the
        node is idle again (the old run finished) and a second has passed (else the new credential is from the
        same second as the revoked one: "Job credential revoked", job FAILED)."""
        deadline = time.monotonic() + timeout
        while "Restarts=1" not in (shown := self.run("scontrol", "show", "job", job, "-o").stdout) or "JobState=PENDING" not in shown:
            assert time.monotonic() < deadline, f"job {job} was not requeued: {shown}\n{context}"
            time.sleep(0.3)
        while self.run("sinfo", "-h", "-o", "%T").stdout.strip() != "idle":
            assert time.monotonic() < deadline + 60, "node did not return to idle after the requeue"
            time.sleep(0.3)
        time.sleep(2.0)
        self.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.dir.glob("*.log")))


def _wait_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _free_port_pair() -> int:
    """A port p with p and p+1 free a moment ago (slurmctld, slurmd): parallel test runs do not collide."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free TCP ports found")


def start_cluster(cpus: int = 2) -> SlurmCluster:
    """Start munge + slurmctld + slurmd in a fresh temp dir and wait until the node is idle."""
    missing = [b for b in BINARIES if _which(b) is None]
    if missing and require_all():
        pytest.fail(f"Slurm/munge binaries missing in CI: {', '.join(missing)} (.ci/run installs them)")
    if missing:
        pytest.skip(f"Slurm/munge not installed (missing {', '.join(missing)}): "
                    "apt-get install slurmctld slurmd slurm-client munge")  # fmt: skip
    d = Path(tempfile.mkdtemp(prefix="fd-slurm-"))
    d.chmod(0o700)
    (d / "state").mkdir()
    (d / "spool").mkdir()
    port = int(os.environ.get("FISHERDIST_SLURM_PORT", "0")) or _free_port_pair()
    (d / "slurm.conf").write_text(_conf(d, cpus, port))
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cluster = SlurmCluster(d, env)
    cluster.run("munged", "--force", f"--key-file={key}", f"--socket={d}/munge.sock", f"--pid-file={d}/munged.pid",
                f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed")  # fmt: skip
    cluster.run("slurmctld", "-f", env["SLURM_CONF"])
    cluster.run("slurmd", "-f", env["SLURM_CONF"], "-N", "localhost")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle":
            return cluster
        time.sleep(0.3)
    logs = cluster.logs()
    stop_cluster(cluster)
    raise RuntimeError(f"private Slurm did not become idle within 60 s\n{logs}")


def stop_cluster(cluster: SlurmCluster) -> None:
    """Stop the daemons by pid (Slurm first: it still needs munge), then remove the directory."""
    d = cluster.dir
    pids = [_pid(d / "slurmctld.pid"), _pid(d / "slurmd.pid")]
    cluster.run("scontrol", "shutdown", check=False)
    for pid in pids:
        if pid:
            _wait_gone(pid)
            try:
                os.kill(pid, 9)  # still there after scontrol shutdown + 20 s: this is our own daemon
            except ProcessLookupError:
                pass
    munged = _pid(d / "munged.pid")
    if munged:
        try:
            os.kill(munged, 15)
        except ProcessLookupError:
            pass
        _wait_gone(munged)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm() -> SlurmCluster:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
