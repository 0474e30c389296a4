"""Distributed LQ decomposition: 2 gloo ranks give exactly the single-process cost table and decomposition,
and each rank reads only the matrices it owns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fisherdist.cli import main
from fisherdist.methods.lqlora import stage
from fisherdist.models.quant import QConfig
from tests.distributed import run_distributed

SHAPES = {"model.layers.0.self_attn.q_proj.weight": (24, 40), "model.layers.0.mlp.up_proj.weight": (56, 24),
          "model.layers.1.self_attn.o_proj.weight": (24, 24), "model.layers.1.mlp.down_proj.weight": (24, 56),
          "model.layers.1.self_attn.k_proj.weight": (16, 24)}


def make_model(root: Path) -> tuple[Path, Path]:
    """A two-file safetensors model with five target matrices (and non-targets), plus Fisher summaries."""
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(s, generator=g) * 0.05 for n, s in SHAPES.items()}
    names = sorted(weights)
    model = root / "model"
    model.mkdir()
    save_file({**{n: weights[n] for n in names[:2]}, "model.norm.weight": torch.ones(24)},
              str(model / "model-00001-of-00002.safetensors"))
    save_file({**{n: weights[n] for n in names[2:]}, "lm_head.weight": torch.randn(10, 24, generator=g)},
              str(model / "model-00002-of-00002.safetensors"))
    summaries = {}
    for n, (m, k) in SHAPES.items():
        f = torch.rand(m, k, generator=g) ** 2
        summaries.update({f"{n}.row": f.sum(1), f"{n}.col": f.sum(0), f"{n}.total": f.sum().reshape(1)})
    save_file(summaries, str(root / "fisher.safetensors"))
    return model, root / "fisher.safetensors"


class RecordingOpen:
    """safe_open that remembers every tensor read, to show a rank reads only its own matrices."""

    read: list[str] = []

    def __init__(self, path: str, framework: str) -> None:
        self.inner = safe_open(path, framework=framework)

    def __enter__(self) -> RecordingOpen:
        self.handle = self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)

    def get_tensor(self, name: str) -> torch.Tensor:
        RecordingOpen.read.append(name)
        return self.handle.get_tensor(name)


def _run(rank: int, world: int, root: str, out: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    stage.safe_open = RecordingOpen  # type: ignore[assignment]
    model, fisher = Path(root) / "model", str(Path(root) / "fisher.safetensors")
    opts = stage.Options(rank=3, iters=6, svd="randomized", fisher=fisher)
    configs = [QConfig.parse("nf2-8bit-fp32-64x256"), QConfig.parse("nf4-3bit-bf16-16x16")]
    table = stage.cost_table(model, configs, opts, r"_proj\.weight$")
    assignment = {n: ("nf3" if i % 2 else "nf4-fp32-32") for i, n in enumerate(sorted(SHAPES))}
    stage.decompose_plan(model, out, assignment, opts, r"_proj\.weight$")
    return {"table": table, "read": sorted(set(RecordingOpen.read))}


def test_two_ranks_equal_one(tmp_path: Path) -> None:
    make_model(tmp_path)
    one = run_distributed(_run, 1, str(tmp_path), str(tmp_path / "one"), timeout=300)[0]
    two = run_distributed(_run, 2, str(tmp_path), str(tmp_path / "two"), timeout=300)
    assert two[0]["table"] == one["table"] and two[1]["table"] == {"matrices": []}
    assert [m["name"] for m in one["table"]["matrices"]] == sorted(SHAPES)
    reads = [set(r["read"]) for r in two]
    assert not reads[0] & reads[1] and reads[0] | reads[1] == set(SHAPES)  # each matrix read by one rank only
    index_one = json.loads((tmp_path / "one" / "index.json").read_text())["matrices"]
    index_two = json.loads((tmp_path / "two" / "index.json").read_text())["matrices"]
    assert {n: {k: v for k, v in e.items() if k != "file"} for n, e in index_two.items()} == \
        {n: {k: v for k, v in e.items() if k != "file"} for n, e in index_one.items()}
    assert {e["file"] for e in index_two.values()} == {"part-00000.safetensors", "part-00001.safetensors"}
    merged = {}
    for part in sorted((tmp_path / "two").glob("part-*.safetensors")):
        merged.update(load_file(str(part)))
    single = load_file(str(tmp_path / "one" / "part-00000.safetensors"))
    assert merged.keys() == single.keys() and all(torch.equal(merged[k], single[k]) for k in single)


def test_decompose_command_plan_and_grid(tmp_path: Path) -> None:
    """The CLI end to end on one process: a cost table, an allocation, then the planned decomposition."""
    model, fisher = make_model(tmp_path)
    common = ["--fisher", str(fisher), "--rank", "2", "--iters", "3", "--targets", r"_proj\.weight$"]
    assert main(["lqlora", "decompose", str(model), "--out", str(tmp_path / "c"), "--grid", "small", *common]) == 0
    costs = json.loads((tmp_path / "c" / "costs.json").read_text())
    assert len(costs["matrices"]) == 5 and all(len(m["configs"]) == 8 for m in costs["matrices"])
    plan = tmp_path / "plan.json"
    assert main(["lqlora", "allocate", str(tmp_path / "c" / "costs.json"), "--budget", "3.5", "--out", str(plan)]) == 0
    assert main(["lqlora", "decompose", str(model), "--out", str(tmp_path / "d"), "--plan", str(plan), *common]) == 0
    index = json.loads((tmp_path / "d" / "index.json").read_text())["matrices"]
    assert {n: e["config"] for n, e in index.items()} == json.loads(plan.read_text())["assignment"]


def test_decompose_command_bad_qconfig_is_one_line(tmp_path: Path, capsys: Any) -> None:
    model, _ = make_model(tmp_path)
    assert main(["lqlora", "decompose", str(model), "--out", str(tmp_path / "o"), "--qconfig", "nf5-xx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nf5-xx" in err and not (tmp_path / "o").exists()
