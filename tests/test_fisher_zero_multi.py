"""ZeRO: several statistics on one model, and an online (EMA) Fisher that reshards.

* two accumulators (sample-granularity empirical and micro-batch rank-1) on one ZeRO-2 model, fed the same
  micro-batches, each equal to a run of that accumulator alone on a fresh model;
* one accumulator with two named states (steps alternate "forget" / "retain"), each equal to a
  single-state run on that state's steps alone, and the default state left empty;
* ``decay`` (EMA) state saved by 2 ZeRO-2 ranks, loaded by 3, continued: equal to one process running the
  same optimizer steps uninterrupted (its EMA is checked against the formula in ``test_fisher_exact``).

Two launches (2 ranks, then 3): DeepSpeed's start-up is the slow part on 2 cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import torch

from fisherdist.distributed.wrap import wrap_model
from fisherdist.fisher import FisherAccumulator, FisherSpec
from fisherdist.fisher.checkpoint import load_fisher, save_fisher
from tests.distributed import run_distributed
from tests.fisher_oracle import dataset, mean_token_nll, micro_batches, tiny_llama
from tests.test_fisher_engine import assert_rel_close

SMALL = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
A = dict(params=SMALL, dtype="float64", bucket_mb=0.01)
B = dict(params=SMALL, dtype="float64", granularity="microbatch", estimator="rank1")
EMA = dict(params=SMALL, dtype="float64", decay=0.6)
N, MB, BETA_STEPS = 12, 3, 24  # EMA: 24 samples, 12 on 2 ranks x 3, then 12 on 3 ranks x 2


def _loop(rank: int, world: int, accs: list[FisherAccumulator], w, steps: Iterator[tuple[list[list[int]], str]], n: int) -> None:
    """record (every accumulator) -> engine.backward of the summed per-sample mean NLLs -> step -> clear."""
    ids, labels = dataset(n)
    for step, state in steps:
        idx = step[rank]
        with ExitStack() as stack:
            for acc in accs:
                stack.enter_context(acc.record(labels[idx], state=state))
            w.backward(mean_token_nll(w.module(input_ids=ids[idx]).logits, labels[idx]).sum())
        for acc in accs:
            acc.step()
        w.clear_grads()


def _zero(accs: list[dict], rank: int, world: int, steps: list[tuple[list[list[int]], str]], n: int = N,
          load: str | None = None, save: str | None = None) -> list[FisherAccumulator]:
    w = wrap_model(tiny_llama(), "zero2", micro_batch_size=MB)
    made = [FisherAccumulator(w, FisherSpec(**spec)) for spec in accs]
    if load:
        load_fisher(made[0].state, load)
    _loop(rank, world, made, w, iter(steps), n)
    if save:
        save_fisher(made[0].state, save)
    return made


def _full(acc: FisherAccumulator, state: str = "default") -> dict[str, torch.Tensor]:
    return {f: acc.full_fisher(f, state=state) for f in SMALL}


def two_ranks(rank: int, world: int, ema_dir: str) -> dict:
    steps = [(s, "default") for s in micro_batches(N, world, MB)]
    a, b = _zero([A, B], rank, world, steps)
    out = {"two": (_full(a), _full(b)), "alone": (_full(_zero([A], rank, world, steps)[0]),
                                                  _full(_zero([B], rank, world, steps)[0]))}
    named = [(s, ("forget", "retain")[k % 2]) for k, s in enumerate(micro_batches(N, world, MB))]
    acc = _zero([A], rank, world, named)[0]
    out["named"] = {name: _full(acc, name) for name in ("forget", "retain")}
    out["named_default_weight"] = acc.state.global_counts()["weight"]
    out["single"] = {name: _full(_zero([A], rank, world, [(s, "default") for s, st in named if st == name])[0])
                     for name in ("forget", "retain")}
    _zero([EMA], rank, world, [(s, "default") for s in _ema_steps(0, world, MB)], BETA_STEPS, save=ema_dir)
    return out


def _ema_steps(lo: int, world: int, mb: int) -> list[list[list[int]]]:
    return [[[lo + i for i in idx] for idx in step] for step in micro_batches(BETA_STEPS // 2, world, mb)]


def three_ranks(rank: int, world: int, ema_dir: str) -> dict:
    acc = _zero([EMA], rank, world, [(s, "default") for s in _ema_steps(BETA_STEPS // 2, world, 2)], BETA_STEPS, load=ema_dir)
    return {"ema": _full(acc), "counts": acc.state.global_counts()}


def _ema_single_process() -> dict[str, torch.Tensor]:
    """The same four optimizer steps in one process: each step records every rank's micro-batch."""
    model = tiny_llama()
    acc = FisherAccumulator(model, FisherSpec(**EMA))
    ids, labels = dataset(BETA_STEPS)
    for step in _ema_steps(0, 2, MB) + _ema_steps(BETA_STEPS // 2, 3, 2):
        for idx in step:
            with acc.record(labels[idx]):
                mean_token_nll(model(input_ids=ids[idx]).logits, labels[idx]).sum().backward()
        acc.step()
        model.zero_grad(set_to_none=True)
    return _full(acc)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    os.environ["DS_ACCELERATOR"] = "cpu"
    ema_dir = str(tmp_path_factory.mktemp("ema") / "fisher")
    return run_distributed(two_ranks, 2, ema_dir, timeout=600), run_distributed(three_ranks, 3, ema_dir, timeout=600)


def test_two_accumulators_each_equal_a_lone_run(results):
    for r in results[0]:
        for got, alone in zip(r["two"], r["alone"]):
            for f in SMALL:
                assert_rel_close(got[f], alone[f], f, tol=1e-12)
                assert got[f].abs().sum() > 0


def test_named_states_each_equal_a_single_state_run(results):
    for r in results[0]:
        assert r["named_default_weight"] == 0
        for name in ("forget", "retain"):
            for f in SMALL:
                assert_rel_close(r["named"][name][f], r["single"][name][f], f"{name} {f}", tol=1e-12)
        assert not torch.allclose(r["named"]["forget"]["lm_head.weight"], r["named"]["retain"]["lm_head.weight"])


def test_ema_saved_on_two_ranks_resumes_on_three(results):
    ref = _ema_single_process()
    for r in results[1]:
        for f in SMALL:
            assert_rel_close(r["ema"][f], ref[f], f)
        assert 0 < r["counts"]["samples"] < BETA_STEPS  # the counts decay with the sums
