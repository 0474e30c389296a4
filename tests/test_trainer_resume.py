"""Checkpoint / resume / preemption of a training stage (SUV on the shared trainer, tests/_suv_train_entry.py).

One uninterrupted single-process run is the reference for every case: a 2-rank run (FSDP2, ZeRO-3) that
SIGTERM stops mid-training exits 75 in bounded time with a complete checkpoint, and its resume -- on 2 ranks
(ZeRO-3; FSDP2 under Slurm), on 1 rank (another backend), after a SIGKILL'd rank -- ends with the reference's adapter and exactly the
reference's data order (no pair seen twice or skipped)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fisherdist.distributed.checkpoint import RunCheckpointer, verify_checkpoint
from fisherdist.distributed.preempt import PREEMPTED_EXIT
from tests.launch_helpers import REPO, job_env

ENTRY = "tests._suv_train_entry"
SIGNAL_AT = 2  # of 6 steps (7 pairs, global batch 4, 3 epochs)


def _cmd(nproc: int, out: Path, backend: str, *args: str) -> list[str]:
    tail = ["-m", ENTRY, "--out", str(out), "--backend", backend, *args]
    if nproc == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "fisherdist.distributed.preempt", "torchrun", "--standalone",
            f"--nproc_per_node={nproc}", "--max_restarts=0", *tail]  # fmt: skip


def _run(nproc: int, out: Path, backend: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(nproc, out, backend, *args), env=job_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=420, check=False)  # DeepSpeed may first (re)build its op


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run: one plain rank, the 2-rank runs' global batches (4 pairs, 2 retain texts);
    computed once per session (a file, so every module importing the fixture shares it)."""
    from tests._suv_train_entry import train

    cached = tmp_path_factory.getbasetemp() / "suv-train-reference.pt"
    if not cached.is_file():
        torch.save(train("none", None, batch_size=4, retain_batch_size=2), cached)
    return torch.load(cached, weights_only=False)


def assert_matches(result: dict, ref: dict, rtol: float, atol: float) -> None:
    steps = [row["step"] for row in result["history"]]
    assert steps == list(range(1, len(ref["history"]) + 1))
    assert [row["records"] for row in result["history"]] == [row["records"] for row in ref["history"]]
    for epoch in range(3):  # every epoch sees each of the 7 pairs exactly once
        seen = sorted(i for row in result["history"][2 * epoch : 2 * epoch + 2] for i in row["records"])
        assert seen == list(range(7))
    for a, b in zip(result["history"], ref["history"]):
        assert abs(a["dpo"] - b["dpo"]) <= rtol * abs(b["dpo"]) + atol and a["lambda"] == pytest.approx(b["lambda"], rel=rtol)
    for name, want in ref["weights"].items():
        torch.testing.assert_close(result["weights"][name].double(), want, rtol=rtol, atol=atol, msg=name)
    moved = max((ref["weights"][n] - t).abs().max().item() for n, t in _initial().items())
    assert moved > 1e-3  # training moved the adapter: the comparison is not vacuous


def _initial() -> dict:
    from tests.test_suv_regularizer import tiny_peft

    return {n: p.detach() for n, p in tiny_peft().named_parameters() if p.requires_grad}


def _preempt(out: Path, backend: str) -> None:
    """2 ranks, SIGTERM to rank 0 during step 2: every rank stops after step 2, checkpoint, exit 75."""
    first = _run(2, out, backend, "--signal-at", str(SIGNAL_AT))
    stopped = time.time()
    assert first.returncode == PREEMPTED_EXIT, first.stderr[-3000:]
    assert "received SIGTERM" in first.stderr
    assert stopped - float((out / "signalled").read_text()) < 60  # a planned stop is quick
    latest = RunCheckpointer(out / "ckpt").latest()
    assert latest == out / "ckpt" / f"step-{SIGNAL_AT}"
    assert verify_checkpoint(latest)["extra"]["step"] == SIGNAL_AT
    assert not (out / "result.pt").exists()


def _resume(out: Path, nproc: int, backend: str) -> dict:
    second = _run(nproc, out, backend)
    assert second.returncode == 0, second.stderr[-3000:]
    own = [line for line in second.stdout.splitlines() if not line.startswith(("DeepSpeed ", "["))]  # DeepSpeed's build notes
    assert own[0].startswith(f"train: resuming from step {SIGNAL_AT} of 6"), second.stdout[:500]
    assert not (out / "ckpt").exists()  # a finished run drops its checkpoints
    return torch.load(out / "result.pt", weights_only=False)


@pytest.mark.timeout(600)
def test_fsdp2_sigterm_then_resume_on_one_rank(tmp_path: Path, reference: dict) -> None:
    """FSDP2 on 2 ranks -> 1 plain rank (a 2-rank FSDP2 resume: tests/test_trainer_slurm.py)."""
    _preempt(tmp_path, "fsdp2")
    assert_matches(_resume(tmp_path, 1, "none"), reference, rtol=1e-8, atol=1e-10)


@pytest.mark.timeout(900)
def test_zero3_sigterm_then_resume(tmp_path: Path, reference: dict) -> None:
    _preempt(tmp_path, "zero3")
    # ZeRO-3 trains a float32 model with float32 masters: float32 round-off from the float64 reference
    assert_matches(_resume(tmp_path, 2, "zero3"), reference, rtol=1e-5, atol=1e-7)


@pytest.mark.timeout(600)
def test_sigkilled_rank_leaves_previous_checkpoint_loadable(tmp_path: Path, reference: dict) -> None:
    """Checkpoint every step, SIGKILL rank 1 while it trains: the agent stops rank 0, the newest complete
    checkpoint verifies, and a 1-rank resume from it ends like the reference."""
    agent = subprocess.Popen(_cmd(2, tmp_path, "fsdp2", "--ckpt-every", "1", "--sleep", "1.0"), env=job_env(),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while RunCheckpointer(tmp_path / "ckpt").latest() is None or not (tmp_path / "pid-rank1").is_file():
            assert time.monotonic() < deadline and agent.poll() is None, "no checkpoint within 180 s"
            time.sleep(0.1)
        os.kill(int((tmp_path / "pid-rank1").read_text()), signal.SIGKILL)
        _, stderr = agent.communicate(timeout=90)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode not in (0, PREEMPTED_EXIT) and "SIGKILL" in stderr, stderr[-3000:]
    latest = RunCheckpointer(tmp_path / "ckpt").latest()
    assert latest is not None
    step = verify_checkpoint(latest)["extra"]["step"]
    second = _run(1, tmp_path, "none")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.startswith(f"train: resuming from step {step} of 6")
    assert_matches(torch.load(tmp_path / "result.pt", weights_only=False), reference, rtol=1e-8, atol=1e-10)
