"""Expected distributed failures as one line each: a peer that never came, a peer that died, Ctrl-C.

These are not bugs, so a traceback (gloo's C++ frames, KeyboardInterrupt from deep inside a collective)
only hides the one fact the user needs. :func:`expected_failures` turns them into :class:`PeerFailure`,
which the CLI prints as ``fisherdist: error: ...`` with its own exit status.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from fisherdist.errors import FisherdistError

INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports Ctrl-C
PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
                     "Timed out", "timed out", "Connection refused", "NCCL communicator was aborted")


class PeerFailure(FisherdistError):
    """Another rank is missing or gone (exit status 1), or the run was interrupted (130)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def where() -> str:
    """``rank R on HOST`` for messages (rank from the process group, else the launcher's variables)."""
    import os

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else os.environ.get("RANK", "0")
    return f"rank {rank} on {socket.gethostname()}"


def first_line(err: BaseException, limit: int = 200) -> str:
    """The most telling line of a (possibly multi-line, C++-decorated) message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


def is_peer_loss(err: BaseException) -> bool:
    """A collective or store failed because a peer disappeared or never answered."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in PEER_LOST_MARKERS)


@contextmanager
def expected_failures() -> Iterator[None]:
    """Re-raise Ctrl-C and a lost peer as one-line :class:`PeerFailure`; anything else passes unchanged."""
    try:
        yield
    except KeyboardInterrupt:
        raise PeerFailure(f"{where()}: interrupted (Ctrl-C)", INTERRUPTED_EXIT) from None
    except RuntimeError as err:
        if not is_peer_loss(err):
            raise
        raise PeerFailure(f"{where()}: lost contact with the other ranks (one died, was killed or hangs): "
                          f"{first_line(err)}") from None
