"""Rendezvous that names who is missing: every rank checks in (rank, host) before the process group forms.

``init_process_group(env://)`` waits silently and then fails with a store traceback that says nothing
about which rank never came. Here each rank writes ``join/<rank> = host`` into the rendezvous store and
counts itself in; a rank that has not seen all ``world_size`` within the timeout raises one
:class:`PeerFailure` naming the missing ranks and, where a joined rank shares their node, the host they
were expected on. The same store then carries the process group (under a prefix of this attempt).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

# the public torch.distributed.{Store,TCPStore,PrefixStore}, imported from where their type stubs live
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from fisherdist.distributed.env import DistEnv
from fisherdist.distributed.failures import PeerFailure, first_line

POLL_S = 0.1
_attempts = 0  # init_distributed calls in this process: every rank makes the same number


def _connect(env: DistEnv, timeout: timedelta) -> Store:
    """The launcher's store (torchrun's agent hosts one) or rank 0's own; a client waits ``timeout``."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "") == "True"
    try:
        return TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0 and not agent,
                             timeout=timeout, wait_for_workers=False, multi_tenant=True)
    except RuntimeError as err:  # DistNetworkError / DistStoreError
        raise PeerFailure(f"rank {env.rank} on {socket.gethostname()}: could not reach the rendezvous store of rank 0 "
                          f"at {env.master_addr}:{env.master_port} within {timeout.total_seconds():.0f} s "
                          f"(dist.timeout_s; {first_line(err, 120)})") from None


def _prefix() -> str:
    """Keys of this attempt only: torchrun restarts reuse the agent's store, a process may init twice."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"fisherdist/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_attempts}"


def _missing_message(store: Store, prefix: str, env: DistEnv, waited: float) -> str:
    joined: dict[int, str] = {}
    for r in range(env.world_size):
        if store.check([f"{prefix}/join/{r}"]):
            joined[r] = store.get(f"{prefix}/join/{r}").decode()
    per_node = env.local_world_size

    def expected(r: int) -> str:
        hosts = {h for j, h in joined.items() if j // per_node == r // per_node}
        return f"rank {r} (expected on {hosts.pop()})" if len(hosts) == 1 else f"rank {r}"

    missing = [expected(r) for r in range(env.world_size) if r not in joined]
    present = ", ".join(f"{r}@{h}" for r, h in sorted(joined.items()))
    return (f"rank {env.rank} on {socket.gethostname()}: {len(missing)} of {env.world_size} ranks did not join within "
            f"{waited:.0f} s: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} (joined: {present}; "
            "raise dist.timeout_s if they are only slow to start)")


def join(env: DistEnv, timeout: timedelta) -> Store:
    """Check in, wait until every rank has, and return the store for ``init_process_group``."""
    global _attempts
    _attempts += 1
    store, prefix = _connect(env, timeout), _prefix()
    start = time.monotonic()
    try:
        store.set(f"{prefix}/join/{env.rank}", socket.gethostname())
        store.add(f"{prefix}/joined", 1)
        while store.add(f"{prefix}/joined", 0) < env.world_size:
            if time.monotonic() - start > timeout.total_seconds():
                raise PeerFailure(_missing_message(store, prefix, env, time.monotonic() - start))
            time.sleep(POLL_S)
    except RuntimeError as err:  # the store itself went away (rank 0 died while we waited)
        raise PeerFailure(f"rank {env.rank} on {socket.gethostname()}: the rendezvous store at "
                          f"{env.master_addr}:{env.master_port} went away ({first_line(err, 120)})") from None
    return PrefixStore(f"{prefix}/pg", store)
