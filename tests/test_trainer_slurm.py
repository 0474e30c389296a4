"""A training stage under the test Slurm: ``scancel --signal=USR1`` mid-training -> checkpoint, ``scontrol
requeue``, the requeued job resumes and ends with the uninterrupted run's adapter and data order."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from fisherdist.distributed.slurm import JobShape, render, submit
from tests.launch_helpers import job_env
from tests.slurm_cluster import SlurmCluster, slurm  # noqa: F401 - the session fixture
from tests.test_trainer_resume import ENTRY, assert_matches, reference  # noqa: F401 - the shared reference


def _wait_step(out: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (out / "done-rank1").is_file():
        assert time.monotonic() < deadline, f"{out}: no finished step within {timeout} s"
        time.sleep(0.2)


@pytest.mark.timeout(420)
def test_usr1_requeues_training_and_it_completes_like_the_reference(slurm: SlurmCluster, tmp_path: Path,  # noqa: F811
                                                                    reference: dict) -> None:  # noqa: F811
    out = tmp_path / "run"
    env = job_env(SLURM_CONF=slurm.env["SLURM_CONF"], FISHERDIST_MODULE=ENTRY)
    env["PATH"] += ":/usr/sbin:/sbin"
    script = render("srun", JobShape(1, 0, 2, 1, "00:08:00"))
    job = submit(script, ["--out", str(out), "--backend", "fsdp2", "--sleep", "1.5"], tmp_path, env=env)
    _wait_step(out, timeout=180)
    slurm.run("scancel", "--signal=USR1", job)
    slurm.release_requeued(job, timeout=120)
    state = slurm.wait_job(job, timeout=240)
    log = "\n".join(p.read_text() for p in tmp_path.glob(f"*-{job}.out"))
    assert state == "COMPLETED", f"job {job} {state}\n{log[-4000:]}\n{slurm.logs()[-3000:]}"
    assert "received SIGUSR1" in log and "requeued" in log and "restart 1" in log, log[-4000:]
    assert "train: resuming from step " in log, log[-4000:]
    assert_matches(torch.load(out / "result.pt", weights_only=False), reference, rtol=1e-8, atol=1e-10)
