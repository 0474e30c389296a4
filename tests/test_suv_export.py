"""Export: the adapter loads with PeftModel.from_pretrained; the merged model reproduces the PEFT logits."""

import torch

from fisherdist.dist.wrap import wrap_model
from fisherdist.methods.suv.export import export_adapter, gather_trainable
from fisherdist.models.peft_utils import LoraSettings, adapted_modules, apply_lora


def test_adapter_and_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    trained = apply_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lora)
    with torch.no_grad():
        for m in adapted_modules(trained):
            m.lora_b.normal_(0, 0.3)
    w = wrap_model(trained, "none")
    export_adapter(gather_trainable(w), tmp_path / "base", lora, tmp_path / "adapter", tmp_path / "merged")

    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-2  # the adapter does change the model
