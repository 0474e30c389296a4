"""launch/{torchrun,deepspeed,mpiexec}.sh on 2 local processes give the single-process result of the toy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.launch_helpers import REPO, STEPS, TOY, assert_same_result, job_env, load_result

SCRIPTS = {"torchrun.sh": {"NPROC_PER_NODE": "2"}, "deepspeed.sh": {"NPROC_PER_NODE": "2"}, "mpiexec.sh": {"NPROC": "2"}}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_launch_script_matches_single_process(script: str, tmp_path: Path, toy_reference: dict) -> None:
    env = job_env(FISHERDIST_MODULE=TOY, MASTER_PORT=str(free_port()), **SCRIPTS[script])
    proc = subprocess.run([str(REPO / "launch" / script), "--out", str(tmp_path), "--steps", str(STEPS)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = load_result(tmp_path)
    assert result["world"] == 2
    assert_same_result(result, toy_reference)
