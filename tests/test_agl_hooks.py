"""The AGL penalty hook on a real PEFT model: its loss equals the dense formulas summed over modules, and
2 DDP ranks (each forming half of every module's rows, one all-reduce of the partial-sum table, the
backend's gradient average) give the single-process gradients of every trainable tensor (float64).
The curvature oracle is the whole Kronecker form tr(G~ dW_T A~ dW_T^T) from the dense factors."""

from __future__ import annotations

import pytest
import torch

from fisherdist.methods.agl.adapters import ModuleBasis, attach, hf_name
from fisherdist.methods.agl.penalty import AglWeights
from fisherdist.methods.agl.train import AglPenalty
from fisherdist.models.peft_utils import LoraSettings, adapted_modules, apply_lora
from tests.distributed import run_distributed
from tests.fisher_oracle import tiny_llama

M, SCALE = 3, 2.0
WEIGHTS = AglWeights(lambda_nc=1.0, tau=0.05)


def _model() -> torch.nn.Module:
    model = apply_lora(tiny_llama(0), LoraSettings(r=4, alpha=8.0, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    bases = {}
    for mod in adapted_modules(model):
        d_out = mod.lora_b.shape[0]
        u = torch.linalg.qr(torch.randn(d_out, M, generator=g, dtype=torch.float64))[0]
        lam = torch.rand(M, generator=g, dtype=torch.float64).sort(descending=True).values
        v = torch.linalg.qr(torch.randn(mod.lora_a.shape[1], M, generator=g, dtype=torch.float64))[0]
        bases[hf_name(mod.name)] = ModuleBasis(u, lam, torch.tensor(0.05), v, lam.flip(0) + 0.1, torch.tensor(0.2))
    attach(model, bases, 2, SCALE, seed=0)
    with torch.no_grad():  # away from B = 0, C = 0, where every penalty and its gradient vanish
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model.to(torch.float64)


def _dense(model: torch.nn.Module) -> float:
    total = 0.0
    for mod in adapted_modules(model):
        agl = mod.module.agl
        da, dt = agl.dense(), SCALE * mod.lora_b @ mod.lora_a
        fisher = (agl.lam[:, None] * (agl.u.T @ da).square()).sum()
        g = agl.u @ torch.diag(agl.lam) @ agl.u.T + agl.sigma * (torch.eye(len(agl.u)) - agl.u @ agl.u.T)
        a = agl.v @ torch.diag(agl.mu) @ agl.v.T + agl.rho * (torch.eye(len(agl.v)) - agl.v @ agl.v.T)
        curv = torch.trace(g @ dt @ a @ dt.T)
        ro = ((1 + WEIGHTS.beta * torch.sigmoid((da + dt).abs() - WEIGHTS.tau)) * da.abs() * dt.abs()).mean()
        gs = (da * dt).sum() ** 2 / (da.square().sum() * dt.square().sum() + WEIGHTS.eps)
        total += float(WEIGHTS.lambda_a * fisher + WEIGHTS.lambda_t * curv
                       + WEIGHTS.lambda_nc * (WEIGHTS.alpha * ro + (1 - WEIGHTS.alpha) * gs))
    return total


def _grads(rank: int, world: int) -> dict[str, torch.Tensor]:
    from fisherdist.distributed.wrap import wrap_model

    model = _model()
    w = wrap_model(model, "ddp" if world > 1 else "none")
    hook = AglPenalty(w, WEIGHTS, SCALE)
    ids = torch.tensor([[1, 2, 3, 4]])
    loss = w.module(input_ids=ids).logits.sum() * 0 + hook.extra_loss(None)  # type: ignore[arg-type]
    w.backward(loss)
    return {"loss": hook.last["loss"], **{n: p.grad.clone() for n, p in w.named_trainable()}}


def test_hook_loss_matches_dense_formulas() -> None:
    from fisherdist.distributed.wrap import wrap_model

    model = _model()
    hook = AglPenalty(wrap_model(model, "none"), WEIGHTS, SCALE)
    assert float(hook.extra_loss(None).detach()) == pytest.approx(_dense(model), rel=1e-10)  # type: ignore[arg-type]


def test_two_ddp_ranks_equal_one_process() -> None:
    want = _grads(0, 1)
    for got in run_distributed(_grads, 2, timeout=300):
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-12)
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)
