"""GaLore / Natural GaLore maths on one process: the Woodbury step against a dense float64 solve, parity
with galore-torch's GaLoreAdamW, and Natural GaLore against a dense float64 oracle written here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from fisherdist.errors import ConfigError, FisherdistError
from fisherdist.optim import GaLoreAdamW, NaturalGaLoreAdamW, batching
from fisherdist.optim.layout import Layout, chunk_bounds
from fisherdist.optim.natural import natural_step, woodbury

SHAPES = [(12, 8), (6, 10), (9, 9)]  # tall, wide, square


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype)) for s in SHAPES] + \
        [torch.nn.Parameter(torch.randn(7, generator=gen, dtype=dtype))]


def decaying(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Noise with singular values 8, 4, 2, ... (gradients have a decaying spectrum; the gaps keep the
    top-r subspace well defined even for galore-torch, which takes its SVD in float32)."""
    if len(shape) == 1:
        return torch.randn(shape, generator=gen, dtype=dtype)
    k = min(shape)
    q1 = torch.linalg.qr(torch.randn(shape[0], k, generator=gen, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(shape[1], k, generator=gen, dtype=torch.float64)).Q
    sigma = 8.0 * 0.5 ** torch.arange(k, dtype=torch.float64)
    return ((q1 * sigma) @ q2.t()).to(dtype)


def quadratic_grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    """Gradient of 0.02 * sum_i ||W_i - 0.5||^2 plus step-dependent noise, computed by hand."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [0.04 * (p.detach() - 0.5) + decaying(tuple(p.shape), gen, p.dtype) for p in params]


def groups(params: list[torch.Tensor], proj_type: str = "std", gap: int = 4, rank: int = 3) -> list[dict]:
    return [{"params": params[:3], "rank": rank, "update_proj_gap": gap, "scale": 0.5, "proj_type": proj_type},
            {"params": params[3:]}]


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        for p, g in zip(params, quadratic_grads(params, t)):
            p.grad = g
        opt.step()


def principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between the column spaces of two orthonormal bases."""
    cos = torch.linalg.svdvals(a.t().double() @ b.double()).clamp(max=1.0)
    return float(torch.arccos(cos.min()))


def test_woodbury_equals_dense_solve() -> None:
    gen = torch.Generator().manual_seed(0)
    hist = torch.randn(5, 30, generator=gen, dtype=torch.float64)
    g = torch.randn(30, generator=gen, dtype=torch.float64)
    for damping in (1e-3, 0.7, 50.0):
        got = woodbury(g, hist, hist @ hist.t(), hist @ g, damping)
        dense = torch.linalg.solve(damping * torch.eye(30, dtype=torch.float64) + hist.t() @ hist, g)
        torch.testing.assert_close(got, dense, rtol=1e-9, atol=1e-9)


def test_window_ring_equals_dense_solve_partial_and_wrapped() -> None:
    """Unfilled (zero) slots and a wrapped ring give the dense solve over exactly the gradients held."""
    gen = torch.Generator().manual_seed(1)
    s, shape, damping = 3, (4, 5), 0.01
    hist, gram = torch.zeros(s, *shape, dtype=torch.float64), torch.zeros(s, s, dtype=torch.float64)
    seen = []
    for t in range(7):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        seen.append(g.reshape(-1))
        got = natural_step(g, hist, gram, t % s, damping, Layout(shape))
        window = torch.stack(seen[-s:], dim=1)
        dense = torch.linalg.solve(damping * torch.eye(20, dtype=torch.float64) + window @ window.t(), g.reshape(-1))
        torch.testing.assert_close(got.reshape(-1), dense, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_parity_with_galore_torch_first_subspace(proj_type: str) -> None:
    from galore_torch import GaLoreAdamW as Reference

    ref_params, our_params, nat_params = make_params(torch.float32), make_params(torch.float32), make_params(torch.float32)
    kw = {"lr": 0.01, "weight_decay": 0.1}
    ref = Reference(groups(ref_params, proj_type), **kw)
    ours = GaLoreAdamW(groups(our_params, proj_type), **kw)
    nat = NaturalGaLoreAdamW(groups(nat_params, proj_type), history=0, **kw)
    for t in range(4):  # the first subspace: update_proj_gap = 4
        for opt, params in ((ref, ref_params), (ours, our_params), (nat, nat_params)):
            run(opt, params, 1, start=t)
        for a, b, c in zip(ref_params, our_params, nat_params):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


def test_projectors_span_same_subspace_every_refresh() -> None:
    from galore_torch import GaLoreAdamW as Reference

    ref_params, our_params = make_params(torch.float64), make_params(torch.float64)
    ref, ours = Reference(groups(ref_params, gap=3), lr=0.01), NaturalGaLoreAdamW(groups(our_params, gap=3),
                                                                                  lr=0.01, history=0)
    for refresh in range(3):
        run(ref, ref_params, 3, start=3 * refresh)
        run(ours, our_params, 3, start=3 * refresh)
        for a, b in zip(ref_params[:3], our_params[:3]):
            pa, pb = ref.state[a]["projector"].ortho_matrix, ours.state[b]["projector"]
            assert pa.shape == pb.shape
            cols = (lambda x: x.t()) if a.shape[0] >= a.shape[1] else (lambda x: x)
            assert principal_angle(cols(pa), cols(pb)) <= 1e-3, (refresh, a.shape)


def natural_oracle(params: list[torch.Tensor], steps: int, rank: int, gap: int, s: int, damping: float,
                   lr: float, scale: float, window_dtype: torch.dtype = torch.float64) -> None:
    """Dense float64 Natural GaLore (one-sided SVD projector, window reset at refresh, dense F^-1; the
    window holds each gradient rounded to ``window_dtype``)."""
    state: dict[int, dict] = {i: {"m": None, "v": None, "win": []} for i in range(len(params))}
    for t in range(steps):
        for i, (p, g) in enumerate(zip(params, quadratic_grads(params, t))):
            st, right = state[i], p.dim() == 2 and p.shape[0] >= p.shape[1]
            if p.dim() == 2 and t % gap == 0:
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                # sign convention: each right singular vector's largest-magnitude entry is positive
                flip = torch.tensor([1.0 if row[row.abs().argmax()] > 0 else -1.0 for row in vh[:rank]],
                                    dtype=torch.float64)
                u, vh = u[:, :rank] * flip, vh[:rank] * flip[:, None]
                st["P"], st["win"] = (vh if right else u), []
            if p.dim() == 2:
                low = g @ st["P"].t() if right else st["P"].t() @ g
                st["win"] = (st["win"] + [low.reshape(-1).to(window_dtype).double()])[-s:]
                w = torch.stack(st["win"], dim=1)
                fisher = damping * torch.eye(w.shape[0], dtype=torch.float64) + w @ w.t()
                g = torch.linalg.solve(fisher, low.reshape(-1)).reshape(low.shape)
            st["m"] = 0.1 * g if st["m"] is None else 0.9 * st["m"] + 0.1 * g
            st["v"] = 0.001 * g * g if st["v"] is None else 0.999 * st["v"] + 0.001 * g * g
            u = st["m"] / (st["v"].sqrt() + 1e-6)
            if p.dim() == 2:
                u = (u @ st["P"] if right else st["P"] @ u) * scale
            size = lr * math.sqrt(1 - 0.999 ** (t + 1)) / (1 - 0.9 ** (t + 1))
            p.data.add_(u, alpha=-size)


@pytest.mark.parametrize("window_dtype", [torch.float64, torch.bfloat16])
def test_natural_galore_matches_dense_oracle_over_refreshes(window_dtype: torch.dtype) -> None:
    oracle, ours = make_params(torch.float64), make_params(torch.float64)
    opt = NaturalGaLoreAdamW(groups(ours, gap=4), lr=0.01, history=3, damping=0.05, history_dtype=window_dtype)
    run(opt, ours, 10)
    natural_oracle(oracle, 10, rank=3, gap=4, s=3, damping=0.05, lr=0.01, scale=0.5, window_dtype=window_dtype)
    for a, b in zip(oracle, ours):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)


def test_randomized_subspace_matches_exact_with_a_spectral_gap() -> None:
    gen = torch.Generator().manual_seed(3)
    low_rank = torch.randn(40, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 30, generator=gen,
                                                                                     dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(40, 30, dtype=torch.float64))
    p.grad = 10 * low_rank + 1e-3 * torch.randn(40, 30, generator=gen, dtype=torch.float64)
    opt = GaLoreAdamW([{"params": [p], "rank": 3}], subspace="randomized", power_iters=1)
    opt.step()
    exact = torch.linalg.svd(p.grad, full_matrices=False).Vh[:3]
    assert principal_angle(opt.state[p]["projector"].t(), exact.t()) <= 1e-3


def test_bad_settings_are_one_line_errors() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 4))
    for kwargs in ({"subspace": "svd"}, {"history": -1}, {"damping": 0.0}):
        with pytest.raises(ConfigError, match="expected"):
            NaturalGaLoreAdamW([{"params": [p], "rank": 2}], **kwargs)
    with pytest.raises(ConfigError, match="proj_type='full'"):
        GaLoreAdamW([{"params": [p], "rank": 2, "proj_type": "full"}])
    with pytest.raises(FisherdistError, match="max_grad_norm"):
        GaLoreAdamW([p], layerwise=True, max_grad_norm=1.0)
    with pytest.raises(FisherdistError, match="grad_accumulation=2"):
        GaLoreAdamW([p], layerwise=True, grad_accumulation=2)
    flat = torch.nn.Parameter(torch.zeros(16))  # what DeepSpeed ZeRO hands an optimizer
    flat.grad = torch.ones(16)
    with pytest.raises(FisherdistError, match="DeepSpeed ZeRO"):
        GaLoreAdamW([{"params": [flat], "rank": 2}]).step()


def same_shape_params(seed: int = 0) -> list[torch.nn.Parameter]:
    """Several matrices per shape, as in a Llama's layers, so the step runs them as batches."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 8), (12, 8), (12, 8), (6, 10), (6, 10), (10, 6), (7,)]
    return [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64)) for s in shapes]


@pytest.mark.parametrize("window_dtype", [torch.float64, torch.bfloat16])
def test_batched_same_shape_matrices_match_dense_oracle_and_survive_reload(window_dtype: torch.dtype) -> None:
    """Batched matrices equal the dense float64 oracle over refreshes, including after a state_dict
    round trip into a fresh optimizer halfway (whose first step must rebuild the reused windows)."""
    oracle, ours = same_shape_params(), same_shape_params()

    def build() -> NaturalGaLoreAdamW:
        return NaturalGaLoreAdamW([{"params": ours[:6], "rank": 3, "update_proj_gap": 4, "scale": 0.5},
                                   {"params": ours[6:]}], lr=0.01, history=3, damping=0.05,
                                  history_dtype=window_dtype)

    opt = build()
    run(opt, ours, 6)
    saved = opt.state_dict()
    opt = build()
    opt.load_state_dict(saved)
    run(opt, ours, 4, start=6)
    natural_oracle(oracle, 10, rank=3, gap=4, s=3, damping=0.05, lr=0.01, scale=0.5, window_dtype=window_dtype)
    for a, b in zip(oracle, ours):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)
    assert len({key[0] for key in opt._batches if key[0] > 1}) >= 1  # some batch held several matrices


@dataclass(frozen=True)
class RankLayout(Layout):
    """A row-sharded layout seen from rank ``index`` of ``parts`` without a process group."""

    index: int = 0
    parts: int = 1

    def world(self) -> tuple[int, int]:
        return self.index, self.parts


def test_sharded_batches_are_cut_alike_on_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks holding 4, 4 and 3 rows of five 11 x 5 matrices (and 3, 3, 1 of 7 x 11; 1, 1, 0 of 2 x 7) cut
    the same batches and refresh chunks, also where the scratch cap splits a batch: a rank cutting from its
    own row count would pair different collectives with its peers'."""
    monkeypatch.setattr(batching, "BATCH_BYTES", 432)  # 2 windows of the largest 11 x 5 shard, 3 of the smallest
    shapes = [(11, 5)] * 5 + [(7, 11)] * 3 + [(2, 7)] * 2
    cuts = []
    for index in range(3):
        layouts = [RankLayout(shape, mesh="mesh", index=index, parts=3) for shape in shapes]
        bounds = [chunk_bounds(m, 3, index) for m, _ in shapes]
        grads = [torch.zeros(end - start, n, dtype=torch.float64) for (start, end), (_, n) in zip(bounds, shapes)]
        sides = ["right" if m >= n else "left" for m, n in shapes]
        plan = batching.batches(grads, layouts, sides, [1] * len(shapes), rank=2, history=3)
        cuts.append((plan, [batching.refresh_chunks(b, layouts[b[0]]) for b in plan]))
    assert cuts[0] == cuts[1] == cuts[2]
    tall = [b for b in cuts[0][0] if b[0] < 5]
    assert len(tall) > 1 and max(len(b) for b in tall) > 1  # cut by the cap, yet batched
