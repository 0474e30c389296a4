"""Preemption without Slurm: one rank gets SIGUSR1, all stop on the same step, checkpoint, exit 75, and the
resumed run (same or different world size) ends exactly like an uninterrupted one. SIGKILL of one rank
stops the others in bounded time and the last complete checkpoint still loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fisherdist.distributed.checkpoint import ModelOptimizerState, RunCheckpointer
from fisherdist.distributed.preempt import PREEMPTED_EXIT
from tests._toy_train import SquaredGradSum, build
from tests.launch_helpers import REPO, STEPS, TOY, assert_same_result, job_env, load_result, run_toy


def _agent(nproc: int, out: Path, *args: str) -> subprocess.Popen:
    """torchrun through fisherdist.distributed.preempt (keeps the workers' exit status)."""
    cmd = [sys.executable, "-m", "fisherdist.distributed.preempt", "torchrun", "--standalone", f"--nproc_per_node={nproc}",
           "--max_restarts=0", "-m", TOY, "--out", str(out), *args]  # fmt: skip
    return subprocess.Popen(cmd, env=job_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(nproc: int, out: Path, *args: str) -> subprocess.CompletedProcess:
    if nproc == 1:
        return run_toy(1, out, *args)
    p = _agent(nproc, out, *args)
    stdout, stderr = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def _last_done(out: Path, rank: int) -> int:
    lines = [json.loads(x) for x in (out / f"log-rank{rank}.jsonl").read_text().splitlines()]
    return max(x.get("done", 0) for x in lines)


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_preempt_then_resume_on_other_world_size(tmp_path: Path, toy_reference: dict, before: int, after: int) -> None:
    first = _run(before, tmp_path, "--steps", str(STEPS), "--signal-at", "2")
    assert first.returncode == PREEMPTED_EXIT, first.stderr[-3000:]
    assert "received SIGUSR1" in first.stderr
    assert [_last_done(tmp_path, r) for r in range(before)] == [3] * before  # every rank stopped after step 3
    assert RunCheckpointer(tmp_path / "ckpt").latest() == tmp_path / "ckpt" / "step-3"
    assert not (tmp_path / "result.pt").exists()
    second = _run(after, tmp_path, "--steps", str(STEPS))
    assert second.returncode == 0, second.stderr[-3000:]
    starts = [json.loads(x) for x in (tmp_path / "log-rank0.jsonl").read_text().splitlines() if '"start"' in x]
    assert starts[-1] == {"start": 3, "world": after, "resumed_from_world": before}
    assert_same_result(load_result(tmp_path), toy_reference)


@pytest.mark.timeout(120)
def test_sigkill_of_one_rank_stops_the_others(tmp_path: Path) -> None:
    agent = _agent(2, tmp_path, "--steps", "200", "--sleep", "0.3", "--ckpt-every", "2")
    try:
        deadline = time.monotonic() + 60
        while RunCheckpointer(tmp_path / "ckpt").latest() is None or not (tmp_path / "pid-rank1").is_file():
            assert time.monotonic() < deadline and agent.poll() is None, "no checkpoint within 60 s"
            time.sleep(0.2)
        os.kill(int((tmp_path / "pid-rank1").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = agent.communicate(timeout=60)
        elapsed = time.monotonic() - killed
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0 and elapsed < 30, (agent.returncode, elapsed)
    assert "rank 1 stopped (signal SIGKILL)" in stderr, stderr[-3000:]
    rank0 = int((tmp_path / "pid-rank0").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(rank0, 0)  # the surviving rank was stopped by the agent, not left hanging
    model, opt = build("plain")
    stat, progress = SquaredGradSum(model), {"step": 0}
    meta = RunCheckpointer(tmp_path / "ckpt").load({"train": ModelOptimizerState(model, opt), "fisher": stat, "progress": progress})
    assert meta["step"] % 2 == 0 and stat.samples == 12 * meta["step"]
