"""A tiny multi-process harness: run a function on N gloo ranks with a hard timeout.

A hang fails the test instead of blocking CI, and any rank's exception is re-raised with its traceback.
The function must be importable (module-level) so the ranks can unpickle it.

Ranks are forked from a ``forkserver`` that imported torch, transformers, peft and deepspeed once
(``tests/_rank_preload.py``): a spawned rank spends ~10 CPU-seconds importing them, which on a 2-core CI
machine was most of the suite.
The server never runs a torch op (no thread pools to inherit), and every rank gets the caller's
``os.environ`` at the time of the call, as a spawned process would.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_context: Any = None
_REPO = Path(__file__).resolve().parent.parent


def _noop() -> None:
    return None


def _forkserver() -> Any:
    """The shared context. Its server starts on first use with DeepSpeed's accelerator fixed to the CPU (as
    every test sets it: a GPU on the machine cannot change what the preloaded deepspeed chose) and this
    checkout on PYTHONPATH (Python 3.11's forkserver ignores the caller's sys.path)."""
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(["tests._rank_preload"])
        saved = {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "PYTHONPATH")}
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), saved["PYTHONPATH"]]))
        try:
            warm = _context.Process(target=_noop, daemon=True)
            warm.start()  # waits for the server's imports, so they never count against a test's timeout
            warm.join()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value
    return _context


def _entry(rank: int, world: int, port: int, env: dict[str, str], fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        buf = io.BytesIO()  # plain bytes: tensors shared through the queue die with the child process
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; return the per-rank results."""
    ctx = _forkserver()
    queue = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_entry, args=(r, world, port, env, fn, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    errors = []
    try:
        # Drain the queue while waiting, so a large result never blocks a child on a full pipe.
        while len(results) + len(errors) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = queue.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                if errors and not any(p.is_alive() for p in procs):
                    break
                continue
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
                deadline = min(deadline, time.monotonic() + 20)  # the others will usually fail soon
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed run failed\n" + "\n".join(errors))
    if len(results) != world:
        raise AssertionError(f"distributed run timed out after {timeout}s: ranks {sorted(results)} finished")
    return [results[r] for r in range(world)]
