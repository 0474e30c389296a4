"""The LoRA initialisation hook on 2 ranks (FSDP2 row shards, ZeRO-3 partitions): custom A/B, the base
rewritten to W - s*B*A without gathering it, and the streamed export of the rewritten and the merged base
(and of the adapter, which on top of the exported base gives the live model's logits),
each against a single-process float64 computation from the original checkpoint."""

from __future__ import annotations

import pytest
import torch

from fisherdist.models.lora_base import export_base, fold_into_base, save_adapter, set_factors
from fisherdist.models.peft_utils import AdaptedModule, LoraSettings, apply_lora
from fisherdist.models.sharded_load import checkpoint_name, load_wrapped
from tests.distributed import run_distributed
from tests.tiny_hf import build_model_dir

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)  # s = alpha / r = 2
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11]])


def factors(name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom factors (both non-zero, unlike PEFT's B = 0), the same on every rank."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(a_shape, generator=g) * 0.2, torch.randn(b_shape, generator=g) * 0.2


def _init(model: torch.nn.Module) -> None:
    set_factors(model, lambda m: factors(m.name, tuple(m.lora_a.shape), tuple(m.lora_b.shape)))
    fold_into_base(model)


def _worker(rank: int, world: int, path, out, backend: str):
    w = load_wrapped(path, torch.float32, backend, "cpu", load="sharded", prepare=lambda m: apply_lora(m, LORA),
                     lora_init=_init)
    logits = w.module(input_ids=IDS).logits.detach()
    export_base(w.unwrapped, path, out / "base", merge=False, shard_bytes=20_000)
    export_base(w.unwrapped, path, out / "merged", merge=True, shard_bytes=20_000)
    save_adapter(w.unwrapped, out / "adapter", out / "base")
    return logits


def _hf_state(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).state_dict()


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_rewritten_base_and_export_on_two_ranks(tmp_path, backend):
    from transformers import AutoModelForCausalLM

    path = build_model_dir(tmp_path)
    logits = run_distributed(_worker, 2, path, tmp_path, backend, timeout=420)
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    ref = apply_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64), LORA)
    want = {k: v.clone() for k, v in original.state_dict().items()}
    for name, mod in ref.named_modules():
        if hasattr(mod, "lora_A"):
            a, b = factors(name, tuple(mod.lora_A["default"].weight.shape), tuple(mod.lora_B["default"].weight.shape))
            key = checkpoint_name(AdaptedModule(name, mod).base_weight_fqn)
            want[key] = want[key] - 2.0 * (b.double() @ a.double())
    base, merged = _hf_state(tmp_path / "base"), _hf_state(tmp_path / "merged")
    assert set(base) == set(want) and set(merged) == set(want)
    changed = 0
    for k, v in want.items():
        torch.testing.assert_close(base[k], v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(merged[k], original.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.allclose(v, original.state_dict()[k])
    assert changed == 8  # q,k,v,o of 2 layers rewritten, nothing else
    with torch.no_grad():  # W - sBA + sBA: the adapted model starts equal to the original
        torch.testing.assert_close(logits[0].double(), original(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[1], logits[0])
    assert len(list((tmp_path / "base").glob("model-*.safetensors"))) > 1  # streamed in several shards
    from peft import PeftModel  # the adapter on top of the rewritten base is the trained model again

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64),
                                     tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=IDS).logits, logits[0].double(), rtol=1e-4, atol=1e-5)
