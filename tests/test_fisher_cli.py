"""``fisherdist fisher`` end to end on a tiny model directory: spawned ranks, export, oracle, bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tests.fisher_oracle import oracle
from tests.test_fisher_engine import assert_rel_close
from tests.tiny_hf import build_model_dir, texts, write_jsonl

N, BS = 12, 3


def fisherdist(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fisherdist", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = build_model_dir(root)
    data = write_jsonl(root / "train.jsonl", texts(N))
    cfg = root / "fisher.yaml"
    cfg.write_text(f"model: {{path: {model_dir}}}\ndata: {{path: {data}, max_length: 16, batch_size: {BS}}}\n"
                   f"fisher: {{params: ['model.layers.1.*', 'lm_head.weight']}}\nout: {root / 'out'}\n")
    return root, model_dir, cfg


@pytest.mark.parametrize("backend,granularity", [("fsdp2", "sample"), ("ddp", "microbatch")])
def test_fisher_run_and_export_match_oracle(world, backend, granularity):
    root, model_dir, cfg = world
    out = root / f"out-{backend}"
    run = fisherdist("fisher", str(cfg), f"out={out}", f"dist.backend={backend}", "dist.nproc=2",
                     f"fisher.granularity={granularity}", "fisher.estimator=centered")
    assert run.returncode == 0, run.stderr[-3000:]
    exp = fisherdist("export", str(out), "--out", str(root / f"{backend}.safetensors"))
    assert exp.returncode == 0, exp.stderr[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").double()
    rows = [tok(t, truncation=True, max_length=16)["input_ids"] for t in texts(N)]
    width = max(len(r) for r in rows)
    ids = torch.full((N, width), tok.pad_token_id)
    labels = torch.full((N, width), -100)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    with safe_open(str(root / f"{backend}.safetensors"), "pt") as f:
        names = list(f.keys())
        got = {n: f.get_tensor(n) for n in names}
        meta = f.metadata()
    assert meta["estimator"] == "centered" and meta["backend"] == backend
    assert sorted(names) == sorted(n for n, _ in model.named_parameters() if n.startswith("model.layers.1.") or n == "lm_head.weight")
    # the oracle sees each sample padded to the batch width of the run; right padding changes nothing causal
    ref = oracle(model, ids, labels, names, granularity, "centered", 2, BS)
    for n in names:
        assert got[n].dtype == torch.float32 and got[n].shape == ref[n].shape
        assert_rel_close(got[n].double(), ref[n], n, tol=1e-4)  # float32 model and statistics


@pytest.mark.parametrize(
    "override,expected,fresh_interpreter",
    [
        ("fisher.params=[nomatch.*]", "pattern 'nomatch.*' matches no parameter", True),
        ("fisher.estimator=magic", "key 'fisher.estimator'", False),
        ("dist.backend=horovod", "key 'dist.backend'", False),
        ("model.path=/nonexistent", "no Hugging Face model directory", False),
    ],
)
def test_bad_input_is_one_line(world, capsys, override, expected, fresh_interpreter):
    """One case in a fresh interpreter (nothing an import prints may reach stderr), the rest in-process."""
    from fisherdist import cli

    _, _, cfg = world
    if fresh_interpreter:
        run = fisherdist("fisher", str(cfg), override)
        code, err = run.returncode, run.stderr
    else:
        capsys.readouterr()
        code, err = cli.main(["fisher", str(cfg), override]), capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("fisherdist: error:") and expected in lines[0], err


def test_preempted_run_checkpoints_and_resumes_on_another_world_size(world, monkeypatch):
    """SIGUSR1/SIGTERM after a micro-batch: checkpoint + exit 75; the restart (2 ranks) ends where an
    uninterrupted run ends."""
    from fisherdist import cli
    from fisherdist.distributed import preempt

    root, _, cfg = world
    out = root / "out-preempt"
    calls = {"n": 0}

    def stop_after_two(self) -> bool:  # the signal arrives during the second micro-batch
        calls["n"] += 1
        return calls["n"] >= 2

    monkeypatch.setattr(preempt.PreemptionHandler, "should_stop", stop_after_two)
    monkeypatch.setenv("FISHERDIST_NO_REQUEUE", "1")
    assert cli.main(["fisher", str(cfg), f"out={out}"]) == preempt.PREEMPTED_EXIT
    from fisherdist.fisher.checkpoint import read_fisher

    _, counts, _ = read_fisher(out / "fisher")
    assert counts["samples"] == 2 * BS  # two micro-batches were accumulated before stopping
    monkeypatch.undo()
    resumed = fisherdist("fisher", str(cfg), f"out={out}", "dist.backend=fsdp2", "dist.nproc=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = fisherdist("fisher", str(cfg), f"out={root / 'out-straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    for name in ("resumed", "straight"):
        src = out if name == "resumed" else root / "out-straight"
        assert fisherdist("export", str(src), "--out", str(root / f"{name}.safetensors")).returncode == 0
    with safe_open(str(root / "resumed.safetensors"), "pt") as a, safe_open(str(root / "straight.safetensors"), "pt") as b:
        assert a.metadata()["counts.samples"] == b.metadata()["counts.samples"] == repr(float(N))
        for n in b.keys():
            assert_rel_close(a.get_tensor(n).double(), b.get_tensor(n).double(), n, tol=1e-5)
