"""Saved Fisher passes record what they mean: a later stage that loads them with other pass settings is
refused in one line naming the key and both values; settings outside the pass (a training weight) reuse
them, and the loaded sums are the saved ones."""

from __future__ import annotations

import pytest
import torch

from fisherdist.distributed.wrap import wrap_model
from fisherdist.errors import CheckpointError
from fisherdist.integrity import read_manifest
from fisherdist.recipes.config import FisherPassSettings
from fisherdist.recipes.fisher_pass import load_passes, run_passes
from tests.fisher_oracle import tiny_llama

PARAMS = ["model.layers.0.self_attn.q_proj.weight"]


def test_passes_record_their_settings_and_refuse_other_ones(tmp_path):
    w = wrap_model(tiny_llama(0).to(torch.float32), "none")
    tokens = {"forbidden": [[5, 6, 7, 8], [9, 10, 11]], "retain": [[12, 13, 14, 15, 16]]}
    settings = FisherPassSettings(batch_size=2, max_length=8)
    saved = run_passes(w, tokens, settings, PARAMS, 0, tmp_path, progress=False)
    recorded = read_manifest(tmp_path / "fisher_forbidden")["settings"]
    assert recorded["fisher.max_length"] == 8 and recorded["fisher.params"] == PARAMS
    assert recorded["data.tokens_sha256"] != read_manifest(tmp_path / "fisher_retain")["settings"]["data.tokens_sha256"]

    loaded = load_passes(w, ["forbidden", "retain"], FisherPassSettings(batch_size=4, max_length=8), PARAMS, tmp_path)
    for name in tokens:  # batch_size is not part of what a pass means (the per-sample engine makes it exact)
        torch.testing.assert_close(loaded[name].fisher(PARAMS[0]), saved[name].fisher(PARAMS[0]), rtol=0, atol=0)
    for acc in (*saved.values(), *loaded.values()):
        acc.close()
    with pytest.raises(CheckpointError) as err:
        load_passes(w, ["forbidden"], FisherPassSettings(batch_size=2, max_length=16), PARAMS, tmp_path)
    line = str(err.value)
    assert "\n" not in line and "fisher_forbidden" in line and "fisher.max_length=8" in line and "=16" in line
