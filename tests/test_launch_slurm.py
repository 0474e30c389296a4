"""The sbatch templates on a real (private, single-node) Slurm: same result as plain torchrun; preemption
with requeue and resume; ``fisherdist slurm submit`` rendering and submission."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fisherdist.cli import main as cli_main
from fisherdist.distributed.slurm import JobShape, render, submit
from tests.launch_helpers import STEPS, TOY, assert_same_result, job_env, load_result
from tests.slurm_cluster import SlurmCluster

# 2 processes in every style, within the node's 2 CPUs: torchrun 1 task x 2 CPUs, srun/deepspeed 2 tasks x 1 CPU
SHAPES = {"torchrun": JobShape(1, 0, 2, 2, "00:05:00"), "srun": JobShape(1, 0, 2, 1, "00:05:00"),
          "deepspeed": JobShape(1, 0, 2, 1, "00:05:00")}  # fmt: skip


def _submit(cluster: SlurmCluster, template: str, workdir: Path, *args: str) -> str:
    env = job_env(SLURM_CONF=cluster.env["SLURM_CONF"], FISHERDIST_MODULE=TOY)
    env["PATH"] += ":/usr/sbin:/sbin"
    return submit(render(template, SHAPES[template]), list(args), workdir, env=env)


def _job_output(workdir: Path, job: str) -> str:
    return "\n".join(p.read_text() for p in workdir.glob(f"*-{job}.out"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("template", ["srun", "deepspeed"])  # torchrun: the real recipe's test below
def test_template_matches_single_process_and_torchrun(slurm: SlurmCluster, tmp_path: Path, toy_reference: dict, template: str) -> None:
    job = _submit(slurm, template, tmp_path, "--out", str(tmp_path / "run"), "--steps", str(STEPS))
    state = slurm.wait_job(job, timeout=150)
    log = _job_output(tmp_path, job)
    assert state == "COMPLETED", f"job {job} {state}\n{log[-4000:]}"
    assert_same_result(load_result(tmp_path / "run"), toy_reference)


def _wait_for(path: Path, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and predicate(path.read_text()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path}: condition not met within {timeout} s")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("template", ["torchrun"])  # srun: tests/test_trainer_slurm.py (a training stage)
def test_preempted_job_requeues_and_resumes(slurm: SlurmCluster, tmp_path: Path, toy_reference: dict, template: str) -> None:
    """scancel --signal=USR1 (what --signal=USR1@T sends) -> checkpoint, scontrol requeue, resume, same end."""
    out = tmp_path / "run"
    job = _submit(slurm, template, tmp_path, "--out", str(out), "--steps", str(STEPS), "--sleep", "1.0")
    _wait_for(out / "log-rank1.jsonl", lambda t: '"done": 1' in t, timeout=90)
    slurm.run("scancel", "--signal=USR1", job)
    slurm.release_requeued(job, timeout=90, context=_job_output(tmp_path, job))
    state = slurm.wait_job(job, timeout=120)
    log = _job_output(tmp_path, job)
    shown = slurm.run("scontrol", "show", "job", job, "-o").stdout
    assert state == "COMPLETED", f"job {job} {state}\n{shown}\n{log[-4000:]}\n{slurm.logs()[-3000:]}"
    starts = [json.loads(line) for line in (out / "log-rank0.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 2 and starts[0]["start"] == 0 and 0 < starts[1]["start"] < STEPS, starts
    assert "requeued" in log and "restart 1" in log, log[-4000:]
    assert_same_result(load_result(out), toy_reference)


def test_submit_dry_run_reflects_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("out: x\n")
    code = cli_main(["slurm", "submit", str(cfg), "dist.backend=fsdp2", "--nodes", "3", "--gpus-per-node", "4",
                     "--time", "01:30:00", "--partition", "a100", "--template", "srun", "--dry-run"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    sbatch = {line.split("=")[0]: line.split("=", 1)[1] for line in text.splitlines() if line.startswith("#SBATCH --") and "=" in line}
    assert sbatch["#SBATCH --nodes"] == "3" and sbatch["#SBATCH --gpus-per-node"] == "4"
    assert sbatch["#SBATCH --ntasks-per-node"] == "4" and sbatch["#SBATCH --time"] == "01:30:00"
    assert sbatch["#SBATCH --partition"] == "a100" and sbatch["#SBATCH --signal"] == "USR1@120"
    assert "#SBATCH --requeue" in text and "#SBATCH --output=%x-%j.out" in text and "--kill-on-bad-exit=1" in text
    assert f"fisher {cfg} dist.backend=fsdp2" in text
    code = cli_main(["slurm", "submit", str(cfg), "--nodes", "2", "--gpus-per-node", "8", "--dry-run"])
    text = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=1" in text and "\nNPROC_PER_NODE=8 " in text
    assert not any(line.startswith("#SBATCH --partition") for line in text.splitlines())  # none asked: none set


def test_submit_prints_job_id(slurm: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Submission through the CLI returns Slurm's job id (the job is cancelled at once; it is not run here)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("out: x\n")
    for key in ("SLURM_CONF", "PATH"):
        monkeypatch.setenv(key, slurm.env[key])
    monkeypatch.chdir(tmp_path)
    assert cli_main(["slurm", "submit", str(cfg), "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "1",
                     "--cpus-per-task", "1", "--template", "srun", "--time", "00:01:00", "--job-name", "probe"]) == 0  # fmt: skip
    job = capsys.readouterr().out.strip()
    assert job.isdigit()
    shown = slurm.run("scontrol", "show", "job", job, "-o").stdout
    assert "JobName=probe" in shown and "TimeLimit=00:01:00" in shown and "Requeue=1" in shown
    slurm.run("scancel", job)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides pointing ``configs/fisher/tiny.yaml`` at a world: the shipped one, else a freshly built test world."""
    shipped = Path(__file__).resolve().parents[1] / "fisherdist" / "world" / "default" / "model" / "config.json"
    if shipped.is_file():
        return ["data.num_samples=16"]
    out = tmp_path_factory.mktemp("world") / "w"
    assert cli_main(["world", "build", "--out", str(out), "--preset", "test"]) == 0
    return [f"model.path={out / 'model'}", f"data.path={out / 'data' / 'general_train.jsonl'}", "data.num_samples=16"]


@pytest.mark.timeout(300)
def test_real_fisher_recipe_torchrun_template_matches_single_process(slurm: SlurmCluster, tmp_path: Path, tiny_world: list[str]) -> None:
    """``fisherdist fisher configs/fisher/tiny.yaml dist.backend=fsdp2`` as a 2-rank Slurm job == one plain process."""
    import torch

    from fisherdist.fisher.checkpoint import read_fisher

    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "fisher" / "tiny.yaml")
    single = subprocess.run([sys.executable, "-m", "fisherdist", "fisher", cfg, *tiny_world, f"out={tmp_path / 'single'}"],
                            env=job_env(), capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    env = job_env(SLURM_CONF=slurm.env["SLURM_CONF"])
    env["PATH"] += ":/usr/sbin:/sbin"
    env.pop("FISHERDIST_MODULE", None)
    job = submit(render("torchrun", SHAPES["torchrun"]), ["fisher", cfg, "dist.backend=fsdp2", *tiny_world, f"out={tmp_path / 'slurm'}"],
                 tmp_path, env=env)  # fmt: skip
    state = slurm.wait_job(job, timeout=150)
    assert state == "COMPLETED", f"job {job} {state}\n{_job_output(tmp_path, job)[-4000:]}"
    (ref, ref_counts, _), (got, got_counts, _) = read_fisher(tmp_path / "single" / "fisher"), read_fisher(tmp_path / "slurm" / "fisher")
    assert got_counts == ref_counts and ref_counts["samples"] == 16
    assert ref.keys() == got.keys() and all(ref[s].keys() == got[s].keys() for s in ref)
    for stat in ref:
        for fqn, value in ref[stat].items():
            scale = float(value.abs().max()) or 1.0
            torch.testing.assert_close(got[stat][fqn], value, rtol=1e-4, atol=1e-5 * scale, msg=f"{stat} {fqn}")
