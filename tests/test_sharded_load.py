"""``model.load=sharded``: each FSDP2 rank reads only its rows from safetensors, and the result is the model
``from_pretrained`` gives (weights, buffers, logits); missing LoRA factors get rank-independent values."""

from __future__ import annotations

import json

import pytest
import torch

from fisherdist.errors import FisherdistError
from fisherdist.models.peft_utils import LoraSettings, adapted_modules, apply_lora
from fisherdist.models.sharded_load import checkpoint_files, initial_value, load_wrapped
from tests.distributed import run_distributed
from tests.tiny_hf import build_model_dir

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _load(rank, world, path, split_index):
    from safetensors.torch import load_file, save_file

    if split_index and rank == 0:  # re-save as a 2-file sharded checkpoint with an index
        sd = load_file(str(path / "model.safetensors"))
        names = sorted(sd)
        parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in parts.items():
            save_file({k: sd[k] for k in keys}, str(path / file), metadata={"format": "pt"})
        (path / "model.safetensors").unlink()
        index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.distributed.barrier()
    w = load_wrapped(path, torch.float64, "fsdp2", "cpu", load="sharded", prepare=lambda m: apply_lora(m, LORA), seed=7)
    local = {n: p.to_local().numel() for n, p in w.unwrapped.named_parameters() if hasattr(p, "to_local")}
    params = {n: _full(p) for n, p in w.unwrapped.named_parameters()}
    logits = w.module(input_ids=torch.tensor([[1, 5, 9, 3, 7, 2]])).logits.detach()  # (the root stays unsharded)
    return params, logits, local, {n: b.clone() for n, b in w.unwrapped.named_buffers()}


@pytest.mark.parametrize("split_index", [False, True])
def test_sharded_load_equals_from_pretrained(tmp_path, split_index):
    from transformers import AutoModelForCausalLM

    path = build_model_dir(tmp_path)
    ref = apply_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64), LORA)
    want = dict(ref.named_parameters())
    results = run_distributed(_load, 2, path, split_index, timeout=180)
    (p0, logits0, local0, buf0), (p1, logits1, local1, _) = results
    for name, t in want.items():
        if "lora_" in name:
            continue
        torch.testing.assert_close(p0[name], t.detach(), rtol=0, atol=0, msg=name)
    for m in adapted_modules(ref):  # LoRA: B = 0, A from the name-seeded generator, the same on both ranks
        a = f"{m.name}.lora_A.default.weight"
        torch.testing.assert_close(p0[a], initial_value(a, tuple(m.lora_a.shape), 7).double())
        torch.testing.assert_close(p1[a], p0[a])
        assert not p0[f"{m.name}.lora_B.default.weight"].any()
    for name, b in ref.named_buffers():
        torch.testing.assert_close(buf0[name], b)
    with torch.no_grad():  # B = 0: the adapted model computes exactly the base model
        torch.testing.assert_close(logits0, ref(input_ids=torch.tensor([[1, 5, 9, 3, 7, 2]])).logits)
    torch.testing.assert_close(logits1, logits0)
    assert sum(local0.values()) + sum(local1.values()) == sum(t.numel() for t in want.values())  # no rank holds it all


def _load_zero3(rank, world, path):
    import deepspeed

    w = load_wrapped(path, torch.float32, "zero3", "cpu", load="sharded", prepare=lambda m: apply_lora(m, LORA), seed=7)
    named = list(w.unwrapped.named_parameters())
    local = {n: p.ds_tensor.numel() for n, p in named}
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        params = {n: p.detach().clone() for n, p in named}
    logits = w.module(input_ids=torch.tensor([[1, 5, 9, 3, 7, 2]])).logits.detach()
    return params, logits, local


def test_zero3_partitioned_load_equals_from_pretrained(tmp_path):
    """ZeRO-3: the model is partitioned while transformers loads it (HfDeepSpeedConfig -> zero.Init)."""
    from transformers import AutoModelForCausalLM

    path = build_model_dir(tmp_path)
    ref = apply_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), LORA)
    for m in adapted_modules(ref):
        with torch.no_grad():
            a = f"{m.name}.lora_A.default.weight"
            m.lora_a.copy_(initial_value(a, tuple(m.lora_a.shape), 7))
    (p0, logits0, local0), (p1, logits1, local1) = run_distributed(_load_zero3, 2, path, timeout=240)
    for name, t in ref.named_parameters():
        torch.testing.assert_close(p0[name], t.detach(), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(p1[name], t.detach(), rtol=0, atol=0, msg=name)
        assert local0[name] < t.numel() or t.numel() == 1, name  # every tensor is partitioned
    with torch.no_grad():
        torch.testing.assert_close(logits0, ref(input_ids=torch.tensor([[1, 5, 9, 3, 7, 2]])).logits)
    torch.testing.assert_close(logits1, logits0)


def test_kaiming_bound_of_lora_a_init():
    a = initial_value("x.lora_A.default.weight", (64, 400), seed=0)
    assert a.abs().max() <= 1 / 400**0.5 and a.abs().max() > 0.9 / 400**0.5  # U(-1/sqrt(fan_in), +)
    assert not torch.equal(a, initial_value("y.lora_A.default.weight", (64, 400), seed=0))


def test_sharded_load_errors(tmp_path):
    with pytest.raises(FisherdistError, match="safetensors"):
        (tmp_path / "config.json").write_text("{}")
        checkpoint_files(tmp_path)
    with pytest.raises(FisherdistError, match="needs dist.backend=fsdp2 or zero3"):
        load_wrapped(build_model_dir(tmp_path / "m"), torch.float32, "zero2", "cpu", load="sharded")
    with pytest.raises(FisherdistError, match="neither in the checkpoint nor a LoRA factor"):
        initial_value("model.layers.0.mlp.up_proj.weight", (4, 4), 0)
