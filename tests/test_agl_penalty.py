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
    b = r(D_OUT, R) * 0.3
    return ModuleFactors(u=u, lam=torch.rand(M, generator=g, dtype=torch.float64) + 0.5,
                         sigma=torch.tensor(0.3, dtype=torch.float64), v=torch.linalg.qr(r(D_IN, K))[0],
                         mu=torch.rand(K, generator=g, dtype=torch.float64) + 0.5, rho=torch.tensor(0.2, dtype=torch.float64),
                         c=r(M, R) * 0.3, a_align=r(R, D_IN), b=b, a_task=r(R, D_IN), u_all=u, b_all=b, scale=2.0)


def _with(f: ModuleFactors, xs: dict[str, torch.Tensor]) -> ModuleFactors:
    """``f`` with the trainable tensors replaced (single process: B's rows are the whole B)."""
    return ModuleFactors(**{**f.__dict__, **xs, "b_all": xs.get("b", f.b_all)})


def _dense(f: ModuleFactors, w: AglWeights) -> dict[str, float]:
    """Every term by its definition, coordinate by coordinate, from the materialised updates."""
    da = (f.scale * f.u @ f.c @ f.a_align).tolist()
    dt = (f.scale * f.b @ f.a_task).tolist()
    cells = [(i, j) for i in range(D_OUT) for j in range(D_IN)]
    fisher = sum(float(f.lam[k]) * sum(float(f.u[i, k]) * da[i][j] for i in range(D_OUT)) ** 2
                 for k in range(M) for j in range(D_IN))
    curv = sum(float(f.lam[i]) * float(f.mu[k]) * sum(float(f.u[a, i]) * dt[a][j] * float(f.v[j, k])
                                                         for a in range(D_OUT) for j in range(D_IN)) ** 2
               for i in range(M) for k in range(K))
    g = f.u @ torch.diag(f.lam) @ f.u.T + f.sigma * (torch.eye(D_OUT, dtype=torch.float64) - f.u @ f.u.T)
    a = f.v @ torch.diag(f.mu) @ f.v.T + f.rho * (torch.eye(D_IN, dtype=torch.float64) - f.v @ f.v.T)
    kron = sum(float(g[i, k]) * dt[k][j] * float(a[j, q]) * dt[i][q]  # tr(G~ dW A~ dW^T)
               for i in range(D_OUT) for k in range(D_OUT) for j in range(D_IN) for q in range(D_IN))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ro = sum((1 + w.beta * sig(abs(da[i][j] + dt[i][j]) - w.tau)) * abs(da[i][j]) * abs(dt[i][j])
             for i, j in cells) / len(cells)
    inner = sum(da[i][j] * dt[i][j] for i, j in cells)
    na, nt = sum(da[i][j] ** 2 for i, j in cells), sum(dt[i][j] ** 2 for i, j in cells)
    gs = inner ** 2 / (na * nt + w.eps)
    loss = w.lambda_a * fisher + w.lambda_t * (kron if w.residual else curv) + w.lambda_nc * (w.alpha * ro + (1 - w.alpha) * gs)
    return {"fisher": fisher, "curvature": curv, "residual": kron - curv, "overlap": ro, "separation": gs, "loss": loss}


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
    f.b_all = f.b
    assert float(_penalty(f, AglWeights())["separation"]) < 1e-20


@pytest.mark.parametrize("term", ["fisher", "curvature", "residual", "overlap", "separation"])
def test_each_term_gradient_by_finite_differences(term: str) -> None:
    f, w = _factors(1), AglWeights(tau=0.3)

    def value(*xs: torch.Tensor) -> torch.Tensor:
        return _penalty(_with(f, dict(zip(PARAMS, xs))), w)[term]

    inputs = tuple(getattr(f, p).clone().requires_grad_(True) for p in PARAMS)
    assert torch.autograd.gradcheck(value, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _update(w: AglWeights) -> torch.Tensor:
    f = _factors(2)
    xs = [getattr(f, p).clone().requires_grad_(True) for p in PARAMS]
    loss = _penalty(_with(f, dict(zip(PARAMS, xs))), w)["loss"]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, xs)])


@pytest.mark.parametrize("drop", [{"lambda_a": 0.0}, {"lambda_t": 0.0}, {"residual": False}, {"alpha": 0.0}, {"alpha": 1.0}])
def test_removing_any_term_changes_the_update(drop: dict[str, float]) -> None:
    """alpha = 0 removes the overlap, alpha = 1 the separation (lambda_nc = 1 so both are visible);
    residual = False keeps only the top-subspace part of the curvature."""
    full = _update(AglWeights(lambda_nc=1.0, tau=0.3))
    ablated = _update(AglWeights(lambda_nc=1.0, tau=0.3, **drop))
    assert (full - ablated).norm() > 1e-3 * full.norm()


def _sharded(rank: int, world: int) -> dict[str, torch.Tensor]:
    import torch.distributed.nn.functional as dnn

    f, w = _factors(4), AglWeights(tau=0.3)
    lo, hi = rank * D_OUT // world, (rank + 1) * D_OUT // world
    xs = {p: getattr(f, p).clone().requires_grad_(True) for p in PARAMS}
    b_rows = xs["b"][lo:hi]
    local = ModuleFactors(**{**f.__dict__, **xs, "u": f.u[lo:hi], "b": b_rows, "b_all": xs["b"],
                             "replicated_share": 1.0 / world})
    out = combine(local_sums(local, w, 2).unsqueeze(0), torch.tensor([30.0], dtype=torch.float64), w,
                  reduce=lambda t: dnn.all_reduce(t))
    (out["loss"] / world).backward()  # every rank holds the same total: the 1/world shares sum to it
    grads = {p: x.grad for p, x in xs.items()}
    for p in ("c", "a_align", "a_task", "b"):  # partial gradients of what a rank holds whole, summed like
        torch.distributed.all_reduce(grads[p])   # a backend does (B: its gathered copy's and its rows')
    return {"loss": out["loss"].detach(), **grads}


def test_two_ranks_with_half_the_rows_equal_one_process() -> None:
    f, w = _factors(4), AglWeights(tau=0.3)
    xs = [getattr(f, p).clone().requires_grad_(True) for p in PARAMS]
    loss = _penalty(_with(f, dict(zip(PARAMS, xs))), w)["loss"]
    want = dict(zip(PARAMS, torch.autograd.grad(loss, xs)))
    for got in run_distributed(_sharded, 2, timeout=120):
        assert float(got["loss"]) == pytest.approx(float(loss.detach()), rel=1e-12)
        for p in ("c", "a_align", "a_task"):
            torch.testing.assert_close(got[p], want[p], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["b"], want["b"], rtol=1e-10, atol=1e-12)
