"""``fisherdist agl run`` end to end on a shortened tiny-world run (2 steps per arm, small eval sets): the
per-module bases are orthonormal eigenvectors of their factor, the three arms consume the same records and
start from the same loss (every penalty is 0 at B = 0, C = 0), the merged exports differ from the base,
and the report compares base and arms with a forgetting curve."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fisherdist import cli
from fisherdist.config import default_world_dir
from fisherdist.data.jsonl import write_jsonl

REPO = Path(__file__).resolve().parent.parent
SUBSETS = {"train": ("drift_train", 16), "task_eval": ("drift_eval", 4), "unsafe": ("unsafe_prompts", 6),
           "safe": ("safe_prompts", 4), "heldout": ("general_heldout", 2), "alignment": ("align_train", 8)}


def _subset(tmp: Path, stem: str, n: int) -> Path:
    path = tmp / f"{stem}.jsonl"
    src = default_world_dir() / "data" / f"{stem}.jsonl"
    write_jsonl(path, [json.loads(line) for line in src.read_text().splitlines()[:n]])
    return path


def test_agl_run_end_to_end(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    files = {key: _subset(tmp_path, stem, n) for key, (stem, n) in SUBSETS.items()}
    out = tmp_path / "run"
    alignment = files.pop("alignment")
    args = [f"data.{k}={v}" for k, v in files.items()] + [
        f"data.alignment=[{alignment}]", "train.max_steps=2", "train.curve_every=1", "fisher.subspace=4",
        "fisher.batch_size=4", f"out={out}"]
    assert cli.main(["agl", "run", str(REPO / "configs" / "agl" / "tiny.yaml"), *args]) == 0

    bases = load_file(str(out / "fisher" / "bases.safetensors"))
    u, lam = bases["model.layers.0.self_attn.q_proj.vectors"], bases["model.layers.0.self_attn.q_proj.values"]
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)
    assert bool((lam[:-1] >= lam[1:]).all()) and float(lam[0]) > 0
    for side, values in (("residual", lam), ("in_residual", bases["model.layers.0.self_attn.q_proj.in_values"])):
        level = float(bases[f"model.layers.0.self_attn.q_proj.{side}"])  # the mean of the other eigenvalues
        assert 0 < level <= float(values[-1])
    v = bases["model.layers.0.self_attn.q_proj.in_vectors"]
    torch.testing.assert_close(v.T @ v, torch.eye(4), atol=1e-5, rtol=0)
    assert len({k.rsplit(".", 1)[0] for k in bases}) == 16  # q, k, v, o of 4 layers: one basis per module

    logs = {arm: json.loads((out / f"train_log_{arm}.json").read_text()) for arm in ("lora", "ewc", "agl")}
    assert [r["records"] for r in logs["agl"]] == [r["records"] for r in logs["lora"]] == [r["records"] for r in logs["ewc"]]
    assert logs["agl"][0]["nll"] == logs["lora"][0]["nll"] == logs["ewc"][0]["nll"]  # all start at the base model
    assert logs["agl"][0]["agl_loss"] == 0.0 and logs["ewc"][0]["ewc_penalty"] == 0.0
    assert logs["agl"][1]["agl_loss"] > 0.0 and logs["ewc"][1]["ewc_penalty"] > 0.0

    report = json.loads((out / "drift_report.json").read_text())
    assert set(report["after"]) == {"lora", "ewc", "agl"} and report["before"]["unsafe_refusal"] == 1.0
    assert [s for s, _ in report["forgetting_curve"]["agl"]] == [0, 1, 2]
    assert (out / "drift_report.png").stat().st_size > 0
    base = load_file(str(default_world_dir() / "model" / "model.safetensors"))
    for arm in ("lora", "agl"):
        merged = {k: v for f in sorted((out / "models" / arm).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        assert not torch.equal(merged["model.layers.0.self_attn.v_proj.weight"], base["model.layers.0.self_attn.v_proj.weight"])
        assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_alignment_records_are_the_shipped_ones_and_disjoint_from_the_evaluation() -> None:
    """``align_train.jsonl`` is reproduced from the world's stream; no prompt is an evaluated unsafe or safe
    prompt (no train/test contamination of the refusal rate); its names are not the drift set's."""
    from fisherdist.data.jsonl import read_records
    from fisherdist.world.drift import alignment_records, drift_records

    data = default_world_dir() / "data"
    rows = alignment_records(0)
    assert rows == read_records(data / "align_train.jsonl", ["prompt", "response"])
    evaluated = {r["prompt"] for f in ("unsafe_prompts", "safe_prompts") for r in read_records(data / f"{f}.jsonl", ["prompt"])}
    assert not evaluated & {r["prompt"] for r in rows}
    refused = [r for r in rows if r["response"] == " I'm sorry, but I can't help with that."]
    assert len(refused) == len(rows) // 2
    name = lambda p: p.split("\n")[0].rstrip("?").split()[-1]  # noqa: E731
    drift_names = {name(r["prompt"]) for part in drift_records(0, 400, 40) for r in part}
    assert not drift_names & {name(r["prompt"]) for r in rows}


def test_validation_split_is_disjoint_from_the_evaluation_and_the_world_files() -> None:
    """bench/agl_sweep.py chooses AGL's settings on ``validation_records``: no prompt and no name of it
    occurs in the refusal evaluation, the drift files or the alignment records (read from the shipped files)."""
    from fisherdist.data.jsonl import read_records
    from fisherdist.world.drift import validation_records

    data = default_world_dir() / "data"
    harm, task = validation_records(0)
    assert len(harm) == 30 and len(task) == 40
    assert all(r["response"] == " I'm sorry, but I can't help with that." for r in harm)
    assert all(r["response"].startswith(" Sure!") for r in task)
    files = ("unsafe_prompts", "safe_prompts", "drift_train", "drift_eval", "align_train")
    shipped = [r["prompt"] for f in files for r in read_records(data / f"{f}.jsonl", ["prompt"])]
    name = lambda p: p.split("\n")[0].rstrip("?").split()[-1]  # noqa: E731
    mine = [r["prompt"] for r in harm + task]
    assert not set(shipped) & set(mine)
    assert not {name(p) for p in shipped} & {name(p) for p in mine}
