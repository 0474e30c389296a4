"""The ILP allocator against brute force, and `fisherdist lqlora allocate`'s formats and one-line errors."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from fisherdist.cli import main
from fisherdist.methods.lqlora.allocate import parse_costs, solve


def random_costs(rng: random.Random, n_mat: int, n_cfg: int) -> dict:
    bits = [2.25, 3.127, 4.127, 4.5, 8.127, 3.0, 2.5, 5.0][:n_cfg]
    mats = []
    for i in range(n_mat):
        errs = sorted((rng.uniform(0.01, 10) for _ in bits), reverse=True)  # more bits, less error, mostly
        if rng.random() < 0.3:
            rng.shuffle(errs)
        cfgs = [{"name": f"c{j}", "bits_per_param": b, "error": e} for j, (b, e) in enumerate(zip(sorted(bits), errs))]
        mats.append({"name": f"m{i}", "numel": rng.choice([64, 1000, 4096, 12288]), "configs": cfgs})
    return {"matrices": mats}


def brute_force(costs: dict, budget: float) -> float:
    mats = costs["matrices"]
    total = sum(m["numel"] for m in mats)
    best = float("inf")
    for pick in itertools.product(*[m["configs"] for m in mats]):
        if sum(m["numel"] * c["bits_per_param"] for m, c in zip(mats, pick)) <= budget * total:
            best = min(best, sum(c["error"] for c in pick))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_ilp_is_optimal_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    costs = random_costs(rng, n_mat=rng.randint(1, 5), n_cfg=rng.randint(2, 5))
    lo = min(c["bits_per_param"] for c in costs["matrices"][0]["configs"])
    hi = max(c["bits_per_param"] for c in costs["matrices"][0]["configs"])
    budget = rng.uniform(lo, hi) if seed % 3 else lo + (hi - lo) / 3
    plan, optimal = solve(parse_costs(costs, "costs"), budget)
    total = sum(m["numel"] for m in costs["matrices"])
    chosen = {m["name"]: {c["name"]: c for c in m["configs"]}[plan["assignment"][m["name"]]] for m in costs["matrices"]}
    used = sum(m["numel"] * chosen[m["name"]]["bits_per_param"] for m in costs["matrices"])
    assert optimal and used <= budget * total
    assert plan["bits_per_param"] == pytest.approx(used / total)
    assert plan["error"] == pytest.approx(sum(c["error"] for c in chosen.values()))
    assert plan["error"] == pytest.approx(brute_force(costs, budget), rel=1e-9)


def test_budget_exactly_on_a_config_is_feasible() -> None:
    costs = {"matrices": [{"name": "a", "numel": 10, "configs": [
        {"name": "nf4", "bits_per_param": 4.126953125, "error": 1.0},
        {"name": "nf3", "bits_per_param": 3.126953125, "error": 5.0}]}]}
    plan, _ = solve(parse_costs(costs, "c"), 4.126953125)
    assert plan["assignment"] == {"a": "nf4"}


def test_allocate_command_writes_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    costs = random_costs(random.Random(7), 4, 4)
    (tmp_path / "costs.json").write_text(json.dumps(costs))
    out = tmp_path / "plan.json"
    out.write_text("old")
    assert main(["lqlora", "allocate", str(tmp_path / "costs.json"), "--budget", "3.5", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert set(plan) == {"assignment", "bits_per_param", "error"}
    assert set(plan["assignment"]) == {m["name"] for m in costs["matrices"]} and plan["bits_per_param"] <= 3.5
    assert plan["error"] == pytest.approx(brute_force(costs, 3.5), rel=1e-9)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind



BAD = [
    ({"matrix": []}, "missing key 'matrices'"),
    ({"matrices": [{"numel": 4, "configs": []}]}, "matrices[0]: missing key 'name'"),
    ({"matrices": [{"name": "a", "numel": "4", "configs": []}]}, "matrices[0].numel: expected int"),
    ({"matrices": [{"name": "a", "numel": 4, "configs": [{"name": "x", "bits_per_param": 4}]}]},
     "matrices[0].configs[0]: missing key 'error'"),
    ({"matrices": [{"name": "a", "numel": 4, "configs": [{"name": "x", "bits_per_param": 4, "error": "big"}]}]},
     "matrices[0].configs[0].error: expected int or float"),
    ({"matrices": [{"name": "a", "numel": 4, "configs": [{"name": "x", "bits_per_param": 4, "error": 1}]}] * 2},
     "appears twice"),
    ({"matrices": [{"name": "a", "numel": 4, "configs": [{"name": "x", "bits_per_param": 4, "error": 1}]}]},
     "--budget 3.0: impossible, the cheapest configurations need 4 bits"),
]


@pytest.mark.parametrize("costs,message", BAD)
def test_bad_input_is_one_line_exit_2(costs: dict, message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(costs))
    out = tmp_path / "plan.json"
    assert main(["lqlora", "allocate", str(path), "--budget", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_unreadable_costs_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.json").write_text("{not json")
    assert main(["lqlora", "allocate", str(tmp_path / "c.json"), "--budget", "3", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
