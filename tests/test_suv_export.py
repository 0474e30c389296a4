"""Export of a trained LoRA run (``models.export.export_lora``, streamed): the adapter loads with
PeftModel.from_pretrained on top of ``models/base``, and the merged model reproduces the live model's logits,
for an untouched base (copied) and for a base rewritten to W - s*B0*A0 (written as trained, checked against
the original checkpoint in float64)."""

import pytest
import torch

from fisherdist.distributed.wrap import wrap_model
from fisherdist.models.export import export_lora
from fisherdist.models.lora_base import fold_into_base, set_factors
from fisherdist.models.peft_utils import LoraSettings, adapted_modules, apply_lora


@pytest.mark.parametrize("rewritten", [False, True])
def test_adapter_base_and_merged_model(tmp_path, rewritten):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "orig")
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)  # s = 2
    trained = apply_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "orig"), lora)
    if rewritten:  # a method's own A0, B0 and the base rewrite, then "training" moves B
        g = torch.Generator().manual_seed(5)
        set_factors(trained, lambda m: (torch.randn(m.lora_a.shape, generator=g), torch.randn(m.lora_b.shape, generator=g)))
        initial = {m.name: (m.lora_a.detach().clone(), m.lora_b.detach().clone()) for m in adapted_modules(trained)}
        fold_into_base(trained)
    with torch.no_grad():
        for m in adapted_modules(trained):
            m.lora_b.add_(torch.randn(m.lora_b.shape) * 0.3)
    export_lora(wrap_model(trained, "none").unwrapped, tmp_path / "orig", tmp_path / "models", "merged", rewritten=rewritten)

    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    models = tmp_path / "models"
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "base"), models / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(models / "merged")
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        orig = AutoModelForCausalLM.from_pretrained(tmp_path / "orig", dtype=torch.float64).state_dict()
        base = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float64).state_dict()
        assert (AutoModelForCausalLM.from_pretrained(tmp_path / "orig")(input_ids=ids).logits - want).abs().max() > 1e-2
    for name, w in orig.items():
        key = f"base_model.model.{name.removesuffix('.weight')}"
        if rewritten and key in initial:
            a0, b0 = (t.double() for t in initial[key])
            w = w - 2.0 * (b0 @ a0)
        assert (base[name] - w).abs().max() < 1e-5, (name, float((base[name] - w).abs().max()))  # float32 round-off


def test_task_vector_merge_command(tmp_path):
    """`fisherdist merge` (SUV-TV) against the formula on the state dicts, float64."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from tests.tiny_hf import build_model_dir

    base_dir = build_model_dir(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    dirs, sds = [], []
    for i in (1, 2):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in base.parameters():
                p.copy_(p + 0.01 * torch.randn(p.shape, generator=g))
        sds.append({k: v.clone() for k, v in base.state_dict().items()})
        base.save_pretrained(tmp_path / f"m{i}")
        dirs.append(str(tmp_path / f"m{i}"))
    run = subprocess.run([sys.executable, "-m", "fisherdist", "merge", *dirs, "--base", str(base_dir),
                          "--out", str(tmp_path / "tv"), "--weights", "1", "0.5"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "tv", dtype=torch.float32).state_dict()
    for name, t in w0.items():
        adapted = any(name.endswith(f"{m}.weight") for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
        want = t.double() + ((sds[0][name].double() - t.double()) + 0.5 * (sds[1][name].double() - t.double())
                             if adapted else 0)
        torch.testing.assert_close(got[name].double(), want, rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "tv" / "tokenizer_config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "fisherdist", "merge", *dirs, "--base", str(base_dir),
                          "--out", str(tmp_path / "x"), "--weights", "1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--weights: got 1 values for 2 models" in bad.stderr


def test_base_copy_or_link(tmp_path):
    """models/base: a loadable full copy, or a symlink to the original (real scale); re-runs replace it."""
    from transformers import AutoModelForCausalLM

    from fisherdist.models.export import save_base_copy
    from tests.tiny_hf import build_model_dir

    src = build_model_dir(tmp_path / "src")
    want = AutoModelForCausalLM.from_pretrained(src).state_dict()
    out = tmp_path / "run" / "models" / "base"
    out.parent.mkdir(parents=True)
    for mode in ("copy", "link", "link", "copy"):
        save_base_copy(src, out, torch.float32, mode)
        assert out.is_symlink() == (mode == "link") and (out / "tokenizer_config.json").is_file()
        got = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(p.name for p in out.parent.iterdir()) == ["base"]  # no temporary leftovers
