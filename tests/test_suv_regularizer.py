"""The differential-Fisher log barrier against a dense float64 computation, single-process and FSDP2."""

import torch

from fisherdist.fisher.layout import Placement
from fisherdist.methods.suv.regularizer import FisherBarrier, differential_fisher
from fisherdist.models.peft_utils import LoraSettings, adapted_modules, apply_lora
from tests.distributed import run_distributed

EPS1, EPS2 = 1e-3, 1e-6


def tiny_peft(dtype=torch.float64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    model = apply_lora(LlamaForCausalLM(cfg).to(dtype), LoraSettings(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B starts at zero; give it a non-trivial value so BA != 0
        for m in adapted_modules(model):
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g, dtype=dtype) * 0.5)
    return model


def random_fishers(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in adapted_modules(model):
        shape = m.module.base_layer.weight.shape
        out[m.base_weight_fqn] = (torch.rand(shape, generator=g, dtype=torch.float64) * 1e-2,
                                  torch.rand(shape, generator=g, dtype=torch.float64) * 1e-2)
    return out


def dense_r(model, fishers):
    """Oracle: full BA and full D per module, float64."""
    total = 0.0
    for m in adapted_modules(model):
        ff, fr = fishers[m.base_weight_fqn]
        d = torch.maximum(ff - fr + EPS1, torch.full_like(ff, EPS1))
        delta = m.lora_b.double() @ m.lora_a.double()
        total = total + torch.log1p(delta**2 / (d + EPS2)).sum()
    return total


def barrier_for(model, fishers, placement_of):
    mods = adapted_modules(model)
    shapes = {m.base_weight_fqn: tuple(fishers[m.base_weight_fqn][0].shape) for m in mods}
    placement = placement_of(shapes)
    frags = {f: placement.fragment(f) for f in shapes}
    cut = lambda t, f: t.reshape(-1)[frags[f].start : frags[f].start + frags[f].numel]  # noqa: E731
    forbid = {f: cut(fishers[f][0], f) for f in shapes}
    retain = {f: cut(fishers[f][1], f) for f in shapes}
    return FisherBarrier.build(mods, forbid, retain, frags, EPS1, EPS2, chunk_rows=3)


def test_barrier_matches_dense_value_and_gradient():
    model = tiny_peft()
    fishers = random_fishers(model)
    want = dense_r(model, fishers)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    barrier = barrier_for(model, fishers, lambda s: Placement.rows(s, 0, 1))
    term, value = barrier.loss_term(1.0)
    term.backward()
    torch.testing.assert_close(value, want.detach(), rtol=1e-12, atol=0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-10, atol=1e-12)


def test_irregular_fragments_sum_to_r():
    """ZeRO-style flat fragments that cut rows in the middle: the per-rank parts add up to R."""
    model = tiny_peft()
    fishers = random_fishers(model)
    want = dense_r(model, fishers).item()
    parts = [barrier_for(model, fishers, lambda s, r=r: Placement.flat_chunks(s, r, 3)).local_value().item() for r in range(3)]
    assert abs(sum(parts) - want) < 1e-10 * want


def test_constant_d_is_isotropic_log_penalty():
    model = tiny_peft()
    fishers = {f: (torch.zeros_like(a), b + 1.0) for f, (a, b) in random_fishers(model).items()}  # F_f < F_r: D = eps1
    assert torch.equal(differential_fisher(fishers[next(iter(fishers))][0], fishers[next(iter(fishers))][1], EPS1).unique(),
                       torch.tensor([EPS1], dtype=torch.float64))
    got = barrier_for(model, fishers, lambda s: Placement.rows(s, 0, 1)).local_value()
    iso = sum(torch.log1p((m.lora_b @ m.lora_a) ** 2 / (EPS1 + EPS2)).sum() for m in adapted_modules(model))
    torch.testing.assert_close(got, iso, rtol=1e-12, atol=0)


def _fsdp2_barrier(rank, world):
    from fisherdist.distributed.wrap import wrap_model

    model = tiny_peft()
    fishers = random_fishers(model)
    w = wrap_model(model, "fsdp2")
    barrier = barrier_for(w.unwrapped, fishers, lambda s: Placement.rows(s, rank, world))
    term, value = barrier.loss_term(1.0)
    term.backward()
    grads = {n: p.grad.full_tensor() for n, p in w.unwrapped.named_parameters() if p.requires_grad}
    return value, grads


def test_fsdp2_two_ranks_equals_single_process():
    model = tiny_peft()
    want = dense_r(model, random_fishers(model))
    want.backward()
    results = run_distributed(_fsdp2_barrier, 2, timeout=120)
    for value, grads in results:
        torch.testing.assert_close(value, want.detach(), rtol=1e-12, atol=0)
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-10, atol=1e-12)
