"""Kronecker factors equal a direct float64 computation from captured activations and output gradients,
and each factor is reduced whole onto exactly one owner rank: single process, DDP, FSDP2 and ZeRO-1/2/3
(streamed during backward), with several record blocks (gradient accumulation) before one step."""

from __future__ import annotations

import os

import pytest
import torch

from fisherdist.distributed.wrap import wrap_model
from fisherdist.fisher import FisherSpec, fisher_step
from fisherdist.fisher.kfac import KroneckerFactors
from fisherdist.fisher.layout import Placement
from fisherdist.fisher.loss import per_sample_nll
from tests.distributed import run_distributed
from tests.fisher_oracle import dataset, mean_token_nll, micro_batches, model_dtype, tiny_llama

N, MB = 12, 3
PARAMS = ["model.layers.*.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]


def direct_factors(layers: list[str], context: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A and G from explicitly captured per-token tensors, one sample at a time (no engine code);
    ``context``: every position up to the last loss-carrying one."""
    model = tiny_llama()
    ids, labels = dataset(N)
    mods = dict(model.named_modules())
    sums = {n: [0, 0] for n in layers}
    tokens = 0
    for i in range(N):
        acts, outs = {}, {}
        def keep_io(m, inp, out, n, acts=acts, outs=outs):  # returns None: the output is unchanged
            acts[n], outs[n] = inp[0], out

        hooks = [mods[n].register_forward_hook(lambda m, inp, out, n=n: keep_io(m, inp, out, n)) for n in layers]
        loss = mean_token_nll(model(input_ids=ids[i : i + 1]).logits, labels[i : i + 1]).sum()
        for h in hooks:
            h.remove()
        grads = torch.autograd.grad(loss, [outs[n] for n in layers])
        keep = torch.zeros(labels.shape[1], dtype=torch.bool)  # logits at t predict label t+1
        keep[:-1] = labels[i, 1:] != -100
        if context:
            keep[: int(keep.nonzero().max()) + 1] = True
        tokens += int(keep.sum())
        for n, g in zip(layers, grads):
            a, g = acts[n][0][keep], g[0][keep]
            sums[n][0] = sums[n][0] + a.T @ a
            sums[n][1] = sums[n][1] + g.T @ g
    return {n: (s[0] / tokens, s[1] / N) for n, s in sums.items()} | {"tokens": tokens}


def run_kfac(rank: int, world: int, backend: str) -> dict:
    w = wrap_model(tiny_llama(), backend if world > 1 else "none")
    acc = KroneckerFactors(w, FisherSpec(params=PARAMS, dtype="float64"))
    ids, labels = dataset(N)
    for step in micro_batches(N, world, MB):
        fisher_step(w, acc, {"input_ids": ids[step[rank]], "labels": labels[step[rank]]})
    return _results(acc)


def run_kfac_zero(rank: int, world: int) -> dict:
    """ZeRO-1/2/3, one launch: record -> engine.backward per micro-batch, ``acc.step()`` only at the
    gradient-accumulation boundary (GAS 2: two record blocks per step), tiny buckets cut inside factors."""
    out = {}
    for stage in (1, 2, 3):
        backend = f"zero{stage}"
        w = wrap_model(tiny_llama(dtype=model_dtype(backend)), backend, gradient_accumulation_steps=2, micro_batch_size=MB // 2)
        acc = KroneckerFactors(w, FisherSpec(params=PARAMS, dtype="float64", bucket_mb=0.01))
        ids, labels = dataset(N)
        for step in micro_batches(N, world, MB):
            for half in (step[rank][: MB // 2], step[rank][MB // 2 :]):
                with acc.record(labels[half]):
                    w.backward(per_sample_nll(w.module(input_ids=ids[half]).logits, labels[half]).sum())
            acc.step()
            w.clear_grads()
        out[backend] = _results(acc)
    return out


def _results(acc: KroneckerFactors) -> dict:
    eig = {n: acc.eigenbasis(f"{n}.A", 2) for n in sorted({f[:-2] for f in acc.placement.shapes})}  # every rank
    return {"factors": {n: acc.factors(n) for n in acc.owned()}, "counts": acc.state.global_counts(), "eig": eig,
            "held": sum(b.numel() for b in acc.state.buffers["sum"].values())}


def test_owned_placement_balances_whole_tensors():
    shapes = {"a": (8, 8), "b": (4, 4), "c": (6, 6), "d": (2, 2)}
    placements = [Placement.owned(shapes, r, 2) for r in range(2)]
    for f in shapes:
        holders = [r for r, p in enumerate(placements) if p.fragment(f).numel]
        assert len(holders) == 1 and placements[0].fragment(f).numel + placements[1].fragment(f).numel == shapes[f][0] ** 2
    loads = [p.local_numel() for p in placements]
    assert sorted(loads) == [16 + 36 + 4, 64]  # greedy largest-first onto the least-loaded rank
    placements[0].validate()


LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]


def _all_backends(rank: int, world: int) -> dict:
    """DDP, FSDP2 and ZeRO-1/2/3 in ONE 2-rank launch (spawning is the slow part on 2 cores)."""
    return {backend: run_kfac(rank, world, backend) for backend in ("ddp", "fsdp2")} | run_kfac_zero(rank, world)


@pytest.fixture(scope="module")
def sharded_results() -> list[dict]:
    os.environ["DS_ACCELERATOR"] = "cpu"
    return run_distributed(_all_backends, 2, timeout=600)


@pytest.mark.parametrize("backend", ["none", "ddp", "fsdp2", "zero1", "zero2", "zero3"])
def test_kfac_matches_direct_computation(sharded_results, backend):
    """ZeRO streams during backward, float32 model on ZeRO-3 (float64 elsewhere)."""
    results = [run_kfac(0, 1, "none")] if backend == "none" else [r[backend] for r in sharded_results]
    _check_factors(results, direct_factors(LAYERS), 1e-4 if backend == "zero3" else 1e-5)


def _check_factors(results: list[dict], ref: dict, tol: float) -> None:
    layers = LAYERS
    got = {}
    for r in results:
        assert not set(r["factors"]) & set(got), "a factor lives on two ranks"
        got.update(r["factors"])
    assert set(got) == set(layers)
    # loss-carrying positions only: the same token count as every other estimator's
    assert results[0]["counts"]["tokens"] == ref["tokens"] == int((dataset(N)[1][:, 1:] != -100).sum())
    for n in layers:
        for x, y in zip(got[n], ref[n]):
            assert ((x - y).norm() / y.norm()).item() < tol, n
    for r in results:  # computed on the owner, the same replicated everywhere
        for n, (values, vectors) in r["eig"].items():
            dense_values, dense_vectors = torch.linalg.eigh(ref[n][0])
            torch.testing.assert_close(values, dense_values.flip(0)[:2], rtol=max(tol, 1e-5), atol=1e-10)
            torch.testing.assert_close(vectors @ vectors.T, dense_vectors[:, -2:] @ dense_vectors[:, -2:].T, rtol=1e-4, atol=1e-8 if tol <= 1e-5 else 1e-6)
    if len(results) > 1:
        total = sum(r["held"] for r in results)
        assert max(r["held"] for r in results) < total  # not all-reduced to everyone


def test_output_factor_only_and_eigenbasis_match_dense():
    """``kfac_factors=output`` keeps G alone (no A is formed); the top-m eigenbasis equals a dense float64
    eigendecomposition of the direct factor (compared as projectors: eigenvector signs are arbitrary)."""
    layers = ["model.layers.1.mlp.down_proj", "lm_head"]
    ref = direct_factors(layers)
    w = wrap_model(tiny_llama(), "none")
    acc = KroneckerFactors(w, FisherSpec(params=[f"{n}.weight" for n in layers], dtype="float64", kfac_factors="output"))
    ids, labels = dataset(N)
    for step in micro_batches(N, 1, MB):
        fisher_step(w, acc, {"input_ids": ids[step[0]], "labels": labels[step[0]]})
    assert sorted(acc.placement.shapes) == sorted(f"{n}.G" for n in layers)
    for n in layers:
        a, g = acc.factors(n)
        assert a is None and ((g - ref[n][1]).norm() / ref[n][1].norm()).item() < 1e-6
        m = 3
        values, vectors = acc.eigenbasis(f"{n}.G", m)
        dense_values, dense_vectors = torch.linalg.eigh(ref[n][1])
        top = dense_vectors[:, -m:]
        torch.testing.assert_close(values, dense_values.flip(0)[:m], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(vectors @ vectors.T, top @ top.T, rtol=1e-5, atol=1e-8)


def test_context_tokens_and_trace_match_dense():
    """``kfac_tokens=context`` also takes the positions before the loss-carrying ones (a prompt's keys and
    values reach the loss through attention): both factors equal the direct computation over those
    positions, and ``trace`` equals the dense factor's trace."""
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    ref, labelled = direct_factors(layers, context=True), direct_factors(layers)
    assert ref["tokens"] > labelled["tokens"]  # the dataset has prompt positions
    w = wrap_model(tiny_llama(), "none")
    acc = KroneckerFactors(w, FisherSpec(params=[f"{n}.weight" for n in layers], dtype="float64", kfac_tokens="context"))
    ids, labels = dataset(N)
    for step in micro_batches(N, 1, MB):
        fisher_step(w, acc, {"input_ids": ids[step[0]], "labels": labels[step[0]]})
    for n in layers:
        a, g = acc.factors(n)
        assert a is not None
        for got, want in ((a, ref[n][0]), (g, ref[n][1])):
            assert ((got - want).norm() / want.norm()).item() < 1e-6
        assert acc.trace(f"{n}.G") == pytest.approx(float(torch.trace(ref[n][1])), rel=1e-6)
