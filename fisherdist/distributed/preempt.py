"""Preemption: finish the current step, agree, checkpoint, exit so that the job is requeued.

Slurm's ``--signal=USR1@<s>`` (a warning before the time limit) and SIGTERM (preemption, ``scancel``)
only set a flag here; the training loop calls :meth:`PreemptionHandler.should_stop` once per step,
which all-reduces the flag (MAX), so every rank stops after the *same* step even if only one rank was
signalled. The loop then writes a checkpoint and calls :meth:`PreemptionHandler.exit_code` (all ranks): under Slurm
rank 0 first runs ``scontrol requeue $SLURM_JOB_ID`` (the job goes back to the queue and resumes from the
latest checkpoint); the process exits with :data:`PREEMPTED_EXIT` (75, ``EX_TEMPFAIL``: "stopped early,
checkpoint written, run the same command again").

``python -m fisherdist.distributed.preempt torchrun ARGS...`` runs torchrun with SIGUSR1 forwarded to its
workers: torchrun starts each worker in its own session, and a signal that reaches only the agent (the
Slurm task) would otherwise kill the agent (SIGUSR1's default action) instead of warning the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from types import FrameType

import torch
import torch.distributed as dist

PREEMPTED_EXIT = 75
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Install flag-setting handlers for ``signals``; restore the previous ones on :meth:`close`."""

    def __init__(self, signals: Iterable[signal.Signals] = DEFAULT_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        print(f"fisherdist: received {self.received.name}; stopping after this step", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        """Whether *this* process was signalled (no communication)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank was signalled. Call once per step on all ranks."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit_code(self) -> int:
        """Collective: requeue under Slurm (rank 0, after the checkpoint is written) and return the exit status.

        The other ranks wait for rank 0's requeue before they return: an early non-zero exit would make
        ``srun --kill-on-bad-exit`` end the job (state FAILED) before rank 0 could requeue it."""
        job = os.environ.get("SLURM_JOB_ID", "")
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0") or 0)
        if job and rank == 0 and os.environ.get("FISHERDIST_NO_REQUEUE", "") != "1":
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, check=False)
            status = "requeued" if result.returncode == 0 else f"could not requeue ({result.stderr.strip()})"
            print(f"fisherdist: checkpoint written; Slurm job {job} {status}", file=sys.stderr, flush=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return PREEMPTED_EXIT

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (torchrun's workers; Linux only, as Slurm is)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _forward(signum: int, frame: FrameType | None) -> None:
    for child in _children(os.getpid()):
        try:
            os.killpg(child, signum)  # each worker leads its own session/process group
        except ProcessLookupError:
            pass


def torchrun_forwarding(argv: list[str]) -> int:
    """``torchrun ARGS`` in this process with SIGUSR1 forwarded to the workers' process groups."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    signal.signal(signal.SIGUSR1, _forward)
    try:
        torchrun_main(argv)
    except ChildFailedError as e:  # keep the worker's status (75 = preempted) instead of torchrun's 1
        rank, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
        print(f"fisherdist: error: rank {rank} stopped ({how})", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "torchrun":
        sys.exit("usage: python -m fisherdist.distributed.preempt torchrun [torchrun arguments]")
    sys.exit(torchrun_forwarding(sys.argv[2:]))
