"""AlignGuard-LoRA penalties: each term against a dense float64 computation written here from the
reference's formulas (section 1a), each term's gradient by finite differences, an ablation in which
dropping any one term changes the update, and 2 gloo ranks holding half the rows each equal one process."""

from __future__ import annotations

import math

import pytest
import torch

from fisherdist.methods.agl.penalty import AglWeights, ModuleFactors, combine, local_sums
from tests.distributed import run_distributed

D_OUT, D_IN, M, R, K = 6, 5, 3, 2, 3
PARAMS = ("c", "a_align", "b", "a_task")


def _factors(seed: int = 0) -> ModuleFactors:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(D_OUT, M, generator=g, dtype=torch.float64))[0]
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return ModuleFactors(u=u, lam=torch.rand(M, generator=g, dtype=torch.float64) + 0.5,
                         h=torch.rand(D_OUT, generator=g, dtype=torch.float64) + 0.1,
                         v=torch.linalg.qr(r(D_IN, K))[0], mu=torch.rand(K, generator=g, dtype=torch.float64) + 0.5,
                         c=r(M, R) * 0.3,
                         a_align=r(R, D_IN), b=r(D_OUT, R) * 0.3, a_task=r(R, D_IN), scale=2.0)


def _dense(f: ModuleFactors, w: AglWeights) -> dict[str, float]:
    """Every term by its definition, coordinate by coordinate, from the materialised updates."""
    da = (f.scale * f.u @ f.c @ f.a_align).tolist()
    dt = (f.scale * f.b @ f.a_task).tolist()
    cells = [(i, j) for i in range(D_OUT) for j in range(D_IN)]
    fisher = sum(float(f.lam[k]) * sum(float(f.u[i, k]) * da[i][j] for i in range(D_OUT)) ** 2
                 for k in range(M) for j in range(D_IN))
    curv = sum(float(f.h[i]) * float(f.mu[k]) * sum(dt[i][j] * float(f.v[j, k]) for j in range(D_IN)) ** 2
               for i in range(D_OUT) for k in range(K))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ro = sum((1 + w.beta * sig(abs(da[i][j] + dt[i][j]) - w.tau)) * abs(da[i][j]) * abs(dt[i][j])
             for i, j in cells) / len(cells)
    inner = sum(da[i][j] * dt[i][j] for i, j in cells)
    na, nt = sum(da[i][j] ** 2 for i, j in cells), sum(dt[i][j] ** 2 for i, j in cells)
    gs = inner ** 2 / (na * nt + w.eps)
    loss = w.lambda_a * fisher + w.lambda_t * curv + w.lambda_nc * (w.alpha * ro + (1 - w.alpha) * gs)
    return {"fisher": fisher, "curvature": curv, "overlap": ro, "separation": gs, "loss": loss}


def _penalty(f: ModuleFactors, w: AglWeights, chunk: int = 4) -> dict[str, torch.Tensor]:
    return combine(local_sums(f, w, chunk).unsqueeze(0), torch.tensor([float(D_OUT * D_IN)], dtype=torch.float64), w)


def test_each_term_matches_dense_computation() -> None:
    w = AglWeights(tau=0.3)
    f = _factors()
    got, want = _penalty(f, w, chunk=4), _dense(f, w)  # chunk 4 of 6 rows: a ragged last chunk
    for name, value in want.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-10), name
    assert all(value > 1e-6 for value in want.values())  # two adapters: no term vanishes


def test_collision_terms_vanish_for_a_projector_split() -> None:
    """The reference's trap, as a check of the oracle: dW_T = (I - UU^T) M, dW_A = UU^T M gives E_GS = 0."""
    f = _factors()
    full = torch.randn(D_OUT, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    f.c, f.a_align = f.u.T @ full / f.scale, torch.eye(D_IN, dtype=torch.float64)
    f.b, f.a_task = (full - f.u @ (f.u.T @ full)) / f.scale, torch.eye(D_IN, dtype=torch.float64)
    assert float(_penalty(f, AglWeights())["separation"]) < 1e-20


@pytest.mark.parametrize("term", ["fisher", "curvature", "overlap", "separation"])
def test_each_term_gradient_by_finite_differences(term: str) -> None:
    f, w = _factors(1), AglWeights(tau=0.3)

    def value(*xs: torch.Tensor) -> torch.Tensor:
        g = ModuleFactors(**{**f.__dict__, **dict(zip(PARAMS, xs))})
        return _penalty(g, w)[term]

    inputs = tuple(getattr(f, p).clone().requires_grad_(True) for p in PARAMS)
    assert torch.autograd.gradcheck(value, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _update(w: AglWeights) -> torch.Tensor:
    f = _factors(2)
    xs = [getattr(f, p).clone().requires_grad_(True) for p in PARAMS]
    loss = _penalty(ModuleFactors(**{**f.__dict__, **dict(zip(PARAMS, xs))}), w)["loss"]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, xs)])


@pytest.mark.parametrize("drop", [{"lambda_a": 0.0}, {"lambda_t": 0.0}, {"alpha": 0.0}, {"alpha": 1.0}])
def test_removing_any_term_changes_the_update(drop: dict[str, float]) -> None:
    """alpha = 0 removes the overlap, alpha = 1 the separation (lambda_nc = 1 so both are visible)."""
    full = _update(AglWeights(lambda_nc=1.0, tau=0.3))
    ablated = _update(AglWeights(lambda_nc=1.0, tau=0.3, **drop))
    assert (full - ablated).norm() > 1e-3 * full.norm()


def _sharded(rank: int, world: int) -> dict[str, torch.Tensor]:
    import torch.distributed.nn.functional as dnn

    f, w = _factors(4), AglWeights(tau=0.3)
    lo, hi = rank * D_OUT // world, (rank + 1) * D_OUT // world
    xs = {p: getattr(f, p).clone().requires_grad_(True) for p in PARAMS}
    b_rows = xs["b"][lo:hi]
    local = ModuleFactors(**{**f.__dict__, **xs, "u": f.u[lo:hi], "h": f.h[lo:hi], "b": b_rows,
                             "replicated_share": 1.0 / world})
    out = combine(local_sums(local, w, 2).unsqueeze(0), torch.tensor([30.0], dtype=torch.float64), w,
                  reduce=lambda t: dnn.all_reduce(t))
    (out["loss"] / world).backward()  # every rank holds the same total: the 1/world shares sum to it
    grads = {p: x.grad for p, x in xs.items()}
    for p in ("c", "a_align", "a_task"):  # the small factors' partial gradients, summed like a backend does
        torch.distributed.all_reduce(grads[p])
    return {"loss": out["loss"].detach(), **grads, "lo": torch.tensor(lo), "hi": torch.tensor(hi)}


def test_two_ranks_with_half_the_rows_equal_one_process() -> None:
    f, w = _factors(4), AglWeights(tau=0.3)
    xs = [getattr(f, p).clone().requires_grad_(True) for p in PARAMS]
    loss = _penalty(ModuleFactors(**{**f.__dict__, **dict(zip(PARAMS, xs))}), w)["loss"]
    want = dict(zip(PARAMS, torch.autograd.grad(loss, xs)))
    for got in run_distributed(_sharded, 2, timeout=120):
        assert float(got["loss"]) == pytest.approx(float(loss.detach()), rel=1e-12)
        for p in ("c", "a_align", "a_task"):
            torch.testing.assert_close(got[p], want[p], rtol=1e-10, atol=1e-12)
        lo, hi = int(got["lo"]), int(got["hi"])
        torch.testing.assert_close(got["b"][lo:hi], want["b"][lo:hi], rtol=1e-10, atol=1e-12)
