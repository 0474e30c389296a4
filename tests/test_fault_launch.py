"""No silent or orphaned ranks: missing peers are named within the timeout, a killed launcher takes its
workers with it, a planned stop says how to resume, and a second run into a live ``out`` is refused.

Launcher cases run ``tests/_spawn_probe.py`` (a test command through the real CLI ``main`` and
``maybe_spawn``) in subprocesses with small timeouts; the lock rules run in-process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fisherdist.distributed.runlock import LOCK_NAME, LockOwner, read_lock, run_lock
from fisherdist.errors import FisherdistError
from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests._spawn_probe", "spawnprobe", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, err


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("fisherdist:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _rank_env(rank: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def test_missing_peers_are_named_within_the_timeout(tmp_path: Path) -> None:
    """Rank 0 alone (rank 1 never comes) and rank 1 alone (no rank 0 store), started side by side."""
    alone0 = _start("join", str(tmp_path / "a"), "--timeout", "3", env=_rank_env(0))
    alone1 = _start("join", str(tmp_path / "b"), "--timeout", "3", env=_rank_env(1))
    (code0, err0), (code1, err1) = _finish(alone0), _finish(alone1)
    line0, line1 = _one_error_line(err0), _one_error_line(err1)
    # "within 3 s" is the wait the rank measured (process start-up on a loaded machine is not part of it)
    assert code0 == 1 and "1 of 2 ranks did not join within 3 s: rank 1 (expected on " + socket.gethostname() + ")" in line0
    assert code1 == 1 and "rank 1 on" in line1 and "could not reach the rendezvous store of rank 0" in line1, line1


def test_planned_stop_and_killed_peer_are_one_summary_line(tmp_path: Path) -> None:
    planned = _start("preempt", str(tmp_path / "p"), "--nproc", "2")
    killed = _start("kill-peer", str(tmp_path / "k"), "--nproc", "2")
    (code_p, err_p), (code_k, err_k) = _finish(planned), _finish(killed)
    line = _one_error_line(err_p)
    assert code_p == 75 and "stopped early" in line and "run the same command again to resume" in line, line
    assert not (tmp_path / "p" / LOCK_NAME).exists()  # released
    assert "Traceback" not in err_k, err_k
    lines = [ln for ln in err_k.splitlines() if ln.strip()]
    assert len(lines) <= 2, err_k  # the launcher's summary, at most one line from the surviving rank
    assert code_k == 1 and "local rank 1 of 2 was killed by SIGKILL" in lines[-1], err_k


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie has exited


def test_sigkill_of_launcher_takes_workers_and_a_second_run_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    launcher = subprocess.Popen([sys.executable, "-m", "tests._spawn_probe", "spawnprobe", "sleep", str(out),
                                 "--nproc", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not all((out / f"pid-{r}").is_file() for r in (0, 1)):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.5)
        workers = [int((out / f"pid-{r}").read_text()) for r in (0, 1)]
        code, err = _finish(_start("sleep", str(out), "--nproc", "2"))  # refused before spawning
        line = _one_error_line(err)
        assert code == 2 and f"PID {launcher.pid}" in line and "another run" in line, line
        launcher.kill()
        launcher.wait()
        gone_by = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "workers outlived their SIGKILLed launcher"
    finally:
        launcher.kill()
        launcher.wait()
    assert read_lock(out / LOCK_NAME) is not None  # left behind by the killed launcher
    with run_lock(out):  # ... and stale: its PID on this host is dead
        mine = read_lock(out / LOCK_NAME)
        assert mine is not None and mine.pid == os.getpid()


def _write_lock(out: Path, **fields: object) -> None:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": "", "heartbeat": time.time(), **fields}
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps(owner))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("fields,taken", [
    ({}, False),                                                  # this host, live PID
    ({"pid": "dead"}, True),                                      # this host, dead PID
    ({"host": "elsewhere"}, False),                               # other host, fresh heartbeat
    ({"host": "elsewhere", "heartbeat": time.time() - 301}, True),  # other host, heartbeat 5 min old
    ({"host": "elsewhere", "slurm_job": "4242"}, True),           # a requeue of the same Slurm job
])
def test_lock_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: dict[str, object], taken: bool) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for var in ("RANK", "SLURM_PROCID", "FISHERDIST_SPAWN_PARENT"):
        monkeypatch.delenv(var, raising=False)
    if fields.get("pid") == "dead":
        fields = {**fields, "pid": _dead_pid()}
    if fields.get("slurm_job") is None:
        fields = {**fields, "slurm_job": "1"}
    _write_lock(tmp_path, **fields)
    before = read_lock(tmp_path / LOCK_NAME)
    assert before is not None
    if not taken:
        with pytest.raises(FisherdistError, match=f"another run is writing into .*host {before.host}, PID {before.pid}"):
            with run_lock(tmp_path):
                pass
        assert read_lock(tmp_path / LOCK_NAME) == before  # untouched
        return
    with run_lock(tmp_path):
        mine = read_lock(tmp_path / LOCK_NAME)
        assert mine is not None and (mine.host, mine.pid, mine.slurm_job) == (socket.gethostname(), os.getpid(), "4242")
    assert not (tmp_path / LOCK_NAME).exists()


def test_heartbeat_refreshes_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "SLURM_PROCID", "FISHERDIST_SPAWN_PARENT"):
        monkeypatch.delenv(var, raising=False)
    with run_lock(tmp_path, heartbeat_s=0.1):
        first = read_lock(tmp_path / LOCK_NAME)
        time.sleep(0.6)
        later = read_lock(tmp_path / LOCK_NAME)
        assert first is not None and later is not None and later.heartbeat > first.heartbeat
        assert isinstance(later, LockOwner) and later.pid == os.getpid()
