"""The shipped tiny world has its behaviours (re-measured from the model, not read from world.json),
and the build is deterministic: same seed -> identical tokenizer, data and weights."""

from __future__ import annotations

import filecmp

import pytest
import torch
from safetensors.torch import load_file

from fisherdist.config import default_world_dir
from fisherdist.models.load import load_model_and_tokenizer
from fisherdist.world.build import build_world
from fisherdist.world.measure import THRESHOLDS, measure_world, verdicts


def test_shipped_world_has_each_behaviour():
    world = default_world_dir()
    model, tok = load_model_and_tokenizer(world / "model")
    got = verdicts(measure_world(model, tok, world / "data"))
    assert set(got) == set(THRESHOLDS)  # every thresholded behaviour, the downstream task included
    for name, verdict in got.items():
        assert verdict["pass"], (name, verdict)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_world(root / name, seed=seed, preset="test", steps=5)
    return root


def _files(d):
    return sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file() and p.name != "world.json")


def test_same_seed_is_bitwise_identical(builds):
    a, b = builds / "a", builds / "b"
    assert _files(a) == _files(b)
    for rel in _files(a):
        if rel.suffix == ".safetensors":
            wa, wb = load_file(a / rel), load_file(b / rel)
            assert all(torch.equal(wa[k], wb[k]) for k in wa)
        else:
            assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def test_other_seed_gives_other_weights(builds):
    wa = load_file(builds / "a" / "model" / "model.safetensors")
    wc = load_file(builds / "c" / "model" / "model.safetensors")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
