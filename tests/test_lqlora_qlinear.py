"""Packed-Q layers: a LoRA model whose base layers hold packed Q and whose adapter starts at L1, L2 computes
exactly what the dense model with W = dequantized Q + L1 L2 computes (the oracle substitutes the dense
weights itself, in float64); the packed bytes are buffers no cast or wrapper touches; the saved directory
loads back to the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fisherdist.methods.lqlora.decompose import lq_decompose
from fisherdist.methods.lqlora.train_stage import lqlora_factors, quantized_lora
from fisherdist.models.peft_utils import LoraSettings
from fisherdist.models.qlinear import QLinear, quantized_layers
from fisherdist.models.quant import QConfig, storage_nbytes
from tests.fisher_oracle import tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
CONFIGS = ["nf3", "nf4-8bit-bf16-16x16", "nf2-fp16-32"]  # double-quantized fp32 / bf16 scales, plain fp16 scales


def _decomposed(model: torch.nn.Module, rank: int) -> tuple[dict, dict]:
    packed, factors = {}, {}
    for i, (name, p) in enumerate(n_p for n_p in model.named_parameters() if any(t in n_p[0] for t in TARGETS)):
        res = lq_decompose(p.detach(), QConfig.parse(CONFIGS[i % len(CONFIGS)]), rank, iters=2, svd="exact")
        packed[name], factors[name] = res.q, (res.l1.double(), res.l2.double())
    return packed, factors


def _setup(rank: int = 4) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(packed LoRA model, dense oracle model, packed weights)."""
    base, dense = tiny_llama(0), tiny_llama(0)
    packed, factors = _decomposed(base, rank)
    with torch.no_grad():
        params = dict(dense.named_parameters())
        for name, q in packed.items():
            l1, l2 = factors[name]
            params[name].copy_(q.dequantize(torch.float64) + l1 @ l2)
    lora = LoraSettings(r=rank, alpha=16.0, dropout=0.0, targets=TARGETS)
    model = quantized_lora(base, lora, packed)
    lqlora_factors(model, factors)
    return model, dense, packed


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(5))


def test_packed_lora_model_equals_dense_q_plus_lowrank() -> None:
    model, dense, packed = _setup()
    ids = _ids()
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, dense(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    layers = quantized_layers(model)
    assert len(layers) == len(packed) == 2 * len(TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any("base_layer" in n for n, _ in model.named_parameters())  # Q is never a parameter


def test_packed_bytes_are_uint8_buffers_that_casts_keep() -> None:
    model, _, packed = _setup()
    before = {n: b.clone() for n, b in model.named_buffers() if ".base_layer." in n}
    assert before and all(b.dtype == torch.uint8 for b in before.values())
    for layer, q in zip(quantized_layers(model).values(), packed.values()):
        assert sum(b.numel() for b in layer.buffers()) == storage_nbytes(q.numel, q.config) == q.nbytes
    model.to(torch.bfloat16)  # DeepSpeed's / FSDP's precision switch: integer buffers are left alone
    after = dict(model.named_buffers())
    assert all(torch.equal(after[n], b) for n, b in before.items())
    layer = next(iter(quantized_layers(model).values()))
    x = torch.randn(2, layer.in_features, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    torch.testing.assert_close(layer(x.double()), x.double() @ layer.quantized().dequantize(torch.float64).T)


def test_qlinear_rejects_a_vector() -> None:
    from fisherdist.models.quant import quantize

    with pytest.raises(ValueError, match="2-D"):
        QLinear(quantize(torch.randn(64), QConfig.parse("nf4")))


def test_saved_directory_loads_back_equal(tmp_path: Path) -> None:
    from fisherdist.models.lora_base import lora_tensors
    from fisherdist.models.quant_lora import load_quantized_lora, save_quantized_lora

    model, dense, packed = _setup()
    src = tmp_path / "base"
    dense.config.save_pretrained(src)
    plain = {n: p.detach() for n, p in dense.named_parameters() if n not in packed}
    lora = LoraSettings(r=4, alpha=16.0, dropout=0.0, targets=TARGETS)
    out = save_quantized_lora(tmp_path / "lqlora", src, plain, packed, lora_tensors(model), lora)
    back = load_quantized_lora(out, torch.float64)
    ids = _ids()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values())
               if a.dtype == torch.uint8)  # the packed bytes round-trip exactly
    with torch.no_grad():  # the rebuilt architecture runs sdpa attention, the oracle's eager: float64 noise only
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-6, atol=1e-6)
    on_disk = (out / "quantized.safetensors").stat().st_size
    assert on_disk >= sum(q.nbytes for q in packed.values())  # + the safetensors header only
    assert on_disk - sum(q.nbytes for q in packed.values()) < 16 * 1024
