"""The retain-only reference model (TOFU's forget-quality baseline): added to an existing world it is the
same bytes as the one a full build trains, and an existing one is never overwritten."""

from __future__ import annotations

import filecmp
import json
import shutil

import pytest

from fisherdist.errors import FisherdistError
from fisherdist.world.build import add_retain_model, build_world
from fisherdist.world.tofu import RETAIN_MODEL


def test_retain_only_rebuild_equals_full_build(tmp_path):
    full = tmp_path / "full"
    record = build_world(full, preset="test", steps=5)
    assert record["retain_model"]["steps"] == 5
    added = tmp_path / "added"
    shutil.copytree(full, added)
    shutil.rmtree(added / RETAIN_MODEL)
    again = add_retain_model(added)
    files = sorted(p.name for p in (full / RETAIN_MODEL).iterdir())
    assert files == sorted(p.name for p in (added / RETAIN_MODEL).iterdir())
    for name in files:
        assert filecmp.cmp(full / RETAIN_MODEL / name, added / RETAIN_MODEL / name, shallow=False), name
    assert again["retain_model"] == json.loads((full / "world.json").read_text())["retain_model"]
    assert not filecmp.cmp(full / "model" / "model.safetensors", full / RETAIN_MODEL / "model.safetensors",
                           shallow=False)  # trained without the forget authors
    with pytest.raises(FisherdistError, match="already exists"):
        add_retain_model(added)
    assert sorted(p.name for p in added.iterdir()) == sorted(p.name for p in full.iterdir())  # no temp left
