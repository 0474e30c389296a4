"""One live run per output directory: ``out/.fisherdist.lock`` names its owner (host, PID, Slurm job).

Two runs writing into the same ``out`` (a restart while the first is still alive, or workers orphaned by
a killed launcher) would interleave their checkpoints. :func:`run_lock` refuses the second run with one
line naming the owner, unless the lock is stale:

* a requeued run of the same Slurm job (same ``SLURM_JOB_ID``) takes its own lock over;
* a lock from this host whose PID is dead is stale;
* a lock from another host is stale once its heartbeat (rewritten every minute) is five minutes old.

Only rank 0 of a launch holds the lock; the workers of ``dist.nproc`` run under their launcher's lock.
Every write is a whole-file rename, so a reader never sees half a lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fisherdist.errors import FisherdistError

LOCK_NAME = ".fisherdist.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 300.0
SPAWN_PARENT_ENV = "FISHERDIST_SPAWN_PARENT"  # set by spawn_self: the PID of the launcher holding the lock


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    slurm_job: str
    heartbeat: float  # time.time() of the owner's last refresh

    @classmethod
    def me(cls) -> LockOwner:
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID", ""), time.time())

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host}, PID {self.pid}{job}"


def read_lock(path: Path) -> LockOwner | None:
    """The owner recorded in ``path``; None when there is no lock (or only an unreadable leftover)."""
    try:
        raw = json.loads(path.read_text())
        return LockOwner(str(raw["host"]), int(raw["pid"]), str(raw["slurm_job"]), float(raw["heartbeat"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # never written by a live owner: every write is atomic


def _write(path: Path, owner: LockOwner) -> None:
    tmp = path.with_name(f"{path.name}.{owner.host}.{owner.pid}.tmp")
    tmp.write_text(json.dumps(asdict(owner)))
    tmp.replace(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def stale_reason(owner: LockOwner, me: LockOwner, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why ``me`` may take ``owner``'s lock over, or None while the owner may still be running."""
    if owner.slurm_job and owner.slurm_job == me.slurm_job:
        return f"requeued Slurm job {me.slurm_job} takes its own lock over"
    if owner.host == me.host:
        return None if _pid_alive(owner.pid) else f"PID {owner.pid} on this host is gone"
    age = me.heartbeat - owner.heartbeat
    return f"heartbeat {age:.0f} s old" if age > stale_after_s else None


def _launch_rank() -> int:
    """This process's rank from the launcher's variables (the lock is taken before any process group)."""
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def under_parent_launch() -> bool:
    """A ``dist.nproc`` worker: its launcher (our parent) holds the lock and ran the preflight."""
    return os.environ.get(SPAWN_PARENT_ENV, "") == str(os.getppid())


def holds_lock() -> bool:
    """Whether this process is the one that takes ``out``'s lock (rank 0 of a launch, not a spawned worker)."""
    return _launch_rank() == 0 and not under_parent_launch()


def acquire(path: Path, stale_after_s: float = STALE_AFTER_S) -> LockOwner:
    """Take the lock at ``path`` or raise :class:`FisherdistError` naming the live owner."""
    me = LockOwner.me()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        owner = read_lock(path)
        reason = "unreadable lock" if owner is None else stale_reason(owner, me, stale_after_s)
        if reason is None:
            assert owner is not None
            raise FisherdistError(f"{path}: another run is writing into {path.parent} ({owner.describe()}); "
                                  "wait for it to finish or stop it first") from None
        print(f"fisherdist: taking over the lock {path} ({reason})", flush=True)
        _write(path, me)
    else:
        os.close(fd)
        _write(path, me)
    if read_lock(path) != me:  # another process took the same stale lock over at the same moment
        raise FisherdistError(f"{path}: another run took this lock at the same moment; try again")
    return me


def _heartbeat(path: Path, owner: LockOwner, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        if read_lock(path) != owner:
            return  # taken over (we were presumed dead): never write over the new owner
        owner = LockOwner(owner.host, owner.pid, owner.slurm_job, time.time())
        _write(path, owner)


@contextmanager
def run_lock(out: str | Path, *, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> Iterator[None]:
    """Hold ``out/.fisherdist.lock`` for the duration of a run (rank 0 only); refuse a second live run."""
    if not holds_lock():
        yield
        return
    path = Path(out) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = acquire(path, stale_after_s)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, owner, heartbeat_s, stop), daemon=True,
                            name="fisherdist-lock-heartbeat")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        current = read_lock(path)
        if current is not None and (current.host, current.pid) == (owner.host, owner.pid):
            path.unlink(missing_ok=True)
