"""Shared pieces of the launcher tests: run the toy (tests/_toy_train.py) under a launcher, compare results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOY = "tests._toy_train"


def job_env(**extra: str) -> dict[str, str]:
    """os.environ with this interpreter's bin first and the repo importable (jobs run elsewhere)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def torchrun(nproc: int, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--max_restarts=0",
           "-m", TOY, *args]  # fmt: skip
    return subprocess.run(cmd, env=env or job_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def run_toy(nproc: int, out: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The toy on ``nproc`` processes (plain torchrun), or in this interpreter's python for 1."""
    if nproc > 1:
        return torchrun(nproc, "--out", str(out), *args, timeout=timeout)
    cmd = [sys.executable, "-m", TOY, "--out", str(out), *args]
    return subprocess.run(cmd, env=job_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def load_result(out: Path) -> dict:
    return torch.load(out / "result.pt", weights_only=False)


def assert_same_result(a: dict, b: dict, atol: float = 1e-12) -> None:
    """Same step, sample count, weights and Fisher-like sums (float64 toy: only summation order differs)."""
    assert (a["step"], a["samples"]) == (b["step"], b["samples"])
    for part in ("weights", "fisher"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            torch.testing.assert_close(a[part][name], b[part][name], rtol=0, atol=atol, msg=f"{part} {name}")


STEPS = 6


@pytest.fixture(scope="session")
def toy_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The toy's uninterrupted single-process result (6 steps): the oracle for every launcher test."""
    out = tmp_path_factory.getbasetemp() / "toy-reference"  # shared by every module that imports the fixture
    if not (out / "result.pt").is_file():
        proc = run_toy(1, out, "--steps", str(STEPS))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return load_result(out)
