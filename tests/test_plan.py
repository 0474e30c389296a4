"""``fisherdist plan`` arithmetic, checked against closed forms written here, brute-force partitions and the
published parameter counts of the shipped configs; bad input is one line and exit status 2."""

from __future__ import annotations

import json
import math

import pytest

from fisherdist.cli import main
from fisherdist.plan.layout import fsdp1, zero12
from fisherdist.plan.model import load_model

PUBLISHED = {  # parameter counts of the public checkpoints
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496, "mixtral-8x7b": 46_702_792_704,
}


def llama2_7b_shapes() -> list[tuple[int, ...]]:
    """Every tensor of Llama-2-7B, from the model card's sizes (no transformers involved)."""
    h, inter, vocab, layers = 4096, 11008, 32000, 32
    per_layer = [(h, h)] * 4 + [(inter, h), (inter, h), (h, inter), (h,), (h,)]
    return [(vocab, h)] + per_layer * layers + [(h,), (vocab, h)]


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_llama2_7b_fsdp2_fisher_is_an_eighth_per_rank(capsys):
    doc = plan_json(capsys, "--model", "llama-2-7b", "--nodes", "1", "--gpus-per-node", "8", "--backend", "fsdp2",
                    "--method", "fisher", "--dtype", "bf16")
    shapes = llama2_7b_shapes()
    total = sum(math.prod(s) for s in shapes)
    assert total == 6_738_415_616 == doc["parameters_total"]
    # FSDP2 pads every shard to ceil(rows / 8) rows; all Llama-2-7B dim-0 sizes divide by 8, so nothing is padded
    padded = sum(math.ceil(s[0] / 8) * math.prod(s[1:]) for s in shapes)
    assert padded * 8 == total
    per_rank = doc["per_rank_bytes"]
    assert per_rank["parameters"] == 2 * total // 8
    assert per_rank["fisher"] == 4 * total // 8
    assert per_rank["total"] == sum(v for k, v in per_rank.items() if k not in ("total", "activations")) \
        + doc["transient_bytes"]["total"]
    assert doc["fits"] is (per_rank["total"] <= 80 * 2**30)


def test_uneven_rows_pad_and_bfloat16_spelling(capsys):
    """3 ranks do not divide Llama-2-7B's rows: the most loaded rank holds ceil(rows / 3) rows of each."""
    args = ["--model", "llama-2-7b", "--gpus-per-node", "3", "--backend", "fsdp2", "--method", "fisher"]
    short = plan_json(capsys, *args, "--dtype", "bf16")
    spelled = plan_json(capsys, *args, "--dtype", "bfloat16")
    assert {k: v for k, v in short.items() if k != "dtype"} == {k: v for k, v in spelled.items() if k != "dtype"}
    rows = sum(math.ceil(s[0] / 3) * math.prod(s[1:]) for s in llama2_7b_shapes())
    assert short["per_rank_bytes"]["parameters"] == 2 * rows
    assert short["per_rank_bytes"]["fisher"] == 4 * rows
    fp32 = plan_json(capsys, *args, "--dtype", "float32")
    assert fp32["per_rank_bytes"]["parameters"] == 2 * short["per_rank_bytes"]["parameters"]


def test_suv_lora_optimizer_state_on_eight_ranks(capsys):
    """SUV trains LoRA r=8 on q,k,v,o: A (8 x 4096) gives each of 8 ranks one row, B (4096 x 8) 512 rows."""
    doc = plan_json(capsys, "--model", "llama-2-7b", "--backend", "fsdp2", "--method", "suv", "--dtype", "bf16")
    lora_per_rank = 32 * 4 * (1 * 4096 + 512 * 8)
    assert doc["per_rank_bytes"]["optimizer"] == 2 * 2 * lora_per_rank  # AdamW moments in bf16
    qkvo_per_rank = 32 * 4 * 4096 * 4096 // 8
    assert doc["per_rank_bytes"]["fisher"] == 4 * qkvo_per_rank
    assert doc["per_rank_bytes"]["method_state"] == 4 * qkvo_per_rank + 4 * 32 * 4 * (8 * 4096 + 4096 * 8)


def _brute_force_cut(sizes: list[int], total: int, world: int) -> list[list[tuple[int, int]]]:
    """Owner of every flat element, one by one: ``out[p][r] = (first index of p on r, count)``."""
    owner_of = [None] * total
    pos = 0
    for p, n in enumerate(sizes):
        for i in range(n):
            owner_of[pos] = (p, i)
            pos += 1
    part = total // world
    out = [[(0, 0)] * world for _ in sizes]
    for r in range(world):
        mine = [owner_of[j] for j in range(r * part, (r + 1) * part) if owner_of[j] is not None]
        for p in {p for p, _ in mine}:
            idx = [i for q, i in mine if q == p]
            assert idx == list(range(idx[0], idx[0] + len(idx)))
            out[p][r] = (idx[0], len(idx))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_zero12_cut_equals_brute_force(world):
    shapes = {"a": (5, 3), "b": (7,), "c": (2, 2, 3), "d": (1,), "e": (11, 1)}
    sizes = [math.prod(s) for s in shapes.values()]
    total = math.ceil(sum(sizes) / (2 * world)) * 2 * world  # DeepSpeed pads to 2 x world elements
    expected = _brute_force_cut(sizes, total, world)
    for rank in range(world):
        got = zero12(shapes, rank, world)
        got.validate()
        assert [got.ranges[f] for f in shapes] == expected


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp1_units_cut_each_flat_parameter(world):
    shapes = {"layers.0.w": (3, 3), "layers.0.n": (3,), "layers.1.w": (3, 3), "layers.1.n": (3,), "head": (5, 3)}
    got = fsdp1(shapes, ["layers.0.", "layers.1."], 0, world)
    got.validate()
    for unit in (["layers.0.w", "layers.0.n"], ["layers.1.w", "layers.1.n"], ["head"]):
        sizes = [math.prod(shapes[f]) for f in unit]
        expected = _brute_force_cut(sizes, math.ceil(sum(sizes) / world) * world, world)
        assert [got.ranges[f] for f in unit] == expected


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_have_the_published_sizes(name):
    assert load_model(name).numel() == PUBLISHED[name]


@pytest.mark.parametrize("method", ["fisher", "suv", "vila", "fila", "agl", "ngalore", "lqlora"])
def test_every_method_plans_and_states_its_assumptions(capsys, method):
    # GaLore needs whole matrices (no ZeRO); AGL's penalties whole LoRA factors (no sharded ones)
    backend = {"ngalore": "fsdp2", "agl": "zero2"}.get(method, "zero3")
    doc = plan_json(capsys, "--model", "llama-2-13b", "--gpus-per-node", "8", "--nodes", "2", "--backend", backend,
                    "--method", method, "--gpu-memory", "141GB")
    assert doc["gpu_bytes"] == 141 * 10**9 and doc["world_size"] == 16
    per_rank = doc["per_rank_bytes"]
    assert set(per_rank) == {"parameters", "gradients", "optimizer", "fisher", "method_state", "activations",
                             "buffers", "total"}
    assert per_rank["parameters"] > 0 and per_rank["total"] > per_rank["parameters"]
    assert any(a.startswith(f"{method}:") for a in doc["assumptions"])


@pytest.mark.parametrize("method, backend, hint", [("ngalore", "zero2", "fsdp2"), ("agl", "fsdp1", "fsdp2")])
def test_unsupported_backend_is_refused_in_one_line(capsys, method, backend, hint):
    assert main(["plan", "--model", "llama-2-7b", "--backend", backend, "--method", method]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--backend {backend}" in err[0] and hint in err[0]


def test_method_defaults_are_the_methods_own():
    """The planner's constants name the landed code's defaults; a change there must show up here."""
    from fisherdist.methods.agl.config import BACKENDS, AglFisher, AglTrain
    from fisherdist.methods.lqlora.config import LqDecompose
    from fisherdist.methods.vila.importance import STATES
    from fisherdist.plan import methods

    assert AglFisher.model_fields["subspace"].default == methods.AGL_SUBSPACE
    assert AglTrain.model_fields["align_rank"].default == methods.AGL_ALIGN_RANK
    assert set(BACKENDS) == set(methods.AGL_BACKENDS)
    assert LqDecompose.model_fields["budget"].default == methods.LQ_BUDGET
    assert STATES == methods.STATES


def test_local_config_directory_and_a_table(capsys, tmp_path):
    from tests.test_plan_measure import WORLD_MODEL

    assert main(["plan", "--model", str(WORLD_MODEL), "--gpus-per-node", "2", "--gpu-memory", "1MiB"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "fisher" in out


@pytest.mark.parametrize("args, where", [
    (["--model", "llama-9b"], "--model"),
    (["--model", "llama-2-7b", "--backend", "fsdp3"], "--backend"),
    (["--model", "llama-2-7b", "--gpu-memory", "lots"], "--gpu-memory"),
    (["--model", "llama-2-7b", "--dtype", "int3"], "--dtype"),
    (["--model", "llama-2-7b", "--params", "*.weight,*q_proj.bias"], "--params"),
])
def test_bad_input_is_one_line_and_status_2(capsys, args, where):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and where in err
