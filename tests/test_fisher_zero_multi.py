"""ZeRO: several statistics on one model, and an online (EMA) Fisher that reshards.

One ZeRO-2 model on 2 ranks carries four accumulators fed the same micro-batches, each compared with the
same accumulator run alone (one process, no other accumulator; the engine's single-process path is
checked against the float64 oracle elsewhere):

* ``A`` sample-granularity empirical (tiny buckets) and ``B`` micro-batch rank-1: two accumulators;
* ``C`` with two named states (steps alternate "forget" / "retain"), each equal to a single-state run on
  that state's steps alone, its default state left empty;
* ``D`` with ``decay`` (EMA), saved by the 2 ranks, loaded by 3 ZeRO-2 ranks and continued: equal to one
  process running the same optimizer steps uninterrupted (the EMA formula is checked in test_fisher_exact).

Two launches (2 ranks, then 3): DeepSpeed's start-up is the slow part on 2 cores.
"""

from __future__ import annotations

import os
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
SPECS = {"A": dict(params=SMALL, dtype="float64", bucket_mb=0.01),
         "B": dict(params=SMALL, dtype="float64", granularity="microbatch", estimator="rank1"),
         "C": dict(params=SMALL, dtype="float64"),
         "D": dict(params=SMALL, dtype="float64", decay=0.6)}
N, MB = 24, 3  # the first 12 samples on 2 ranks x 3, the last 12 (EMA only) on 3 ranks x 2
NAMED = ("forget", "retain")


def _steps(lo: int, world: int, mb: int) -> list[list[list[int]]]:
    """``micro_batches`` of samples ``lo .. lo + 12``."""
    return [[[lo + i for i in idx] for idx in step] for step in micro_batches(N // 2, world, mb)]


def _run(model, backward, accs: dict[str, FisherAccumulator], steps: list[list[list[int]]], ranks: list[int]) -> None:
    """Per optimizer step: the listed ranks' micro-batches (one each on a real rank, all of them in one process),
    each recorded by every accumulator (C into the step's named state); ``backward`` also drops the gradients."""
    ids, labels = dataset(N)
    for k, step in enumerate(steps):
        for r in ranks:
            idx = step[r]
            with ExitStack() as stack:
                for name, acc in accs.items():
                    stack.enter_context(acc.record(labels[idx], state=NAMED[k % 2] if name == "C" else "default"))
                backward(mean_token_nll(model(input_ids=ids[idx]).logits, labels[idx]).sum())
        for acc in accs.values():
            acc.step()


def _zero(rank: int, world: int, names: str, steps: list[list[list[int]]], load: str | None = None):
    w = wrap_model(tiny_llama(), "zero2", micro_batch_size=MB)
    accs = {n: FisherAccumulator(w, FisherSpec(**SPECS[n])) for n in names}
    if load:
        load_fisher(accs["D"].state, load)

    def backward(loss: torch.Tensor) -> None:
        w.backward(loss)
        w.clear_grads()  # a Fisher pass on a live engine: no optimizer step, gradients dropped

    _run(w.module, backward, accs, steps, [rank])
    return accs


def _full(acc: FisherAccumulator, state: str = "default") -> dict[str, torch.Tensor]:
    return {f: acc.full_fisher(f, state=state) for f in SMALL}


def two_ranks(rank: int, world: int, ema_dir: str) -> dict:
    accs = _zero(rank, world, "ABCD", _steps(0, world, MB))
    save_fisher(accs["D"].state, ema_dir)
    return {"A": _full(accs["A"]), "B": _full(accs["B"]), "C": {s: _full(accs["C"], s) for s in NAMED},
            "C_default_weight": accs["C"].state.global_counts()["weight"]}


def three_ranks(rank: int, world: int, ema_dir: str) -> dict:
    accs = _zero(rank, world, "D", _steps(N // 2, world, 2), load=ema_dir)
    return {"D": _full(accs["D"]), "counts": accs["D"].state.global_counts()}


def _alone(name: str, steps: list[list[list[int]]], ranks: list[int], keep: int | None = None) -> FisherAccumulator:
    """Accumulator ``name`` alone in one process; ``keep``: only the steps of that parity (one named state)."""
    model = tiny_llama()
    acc = FisherAccumulator(model, FisherSpec(**SPECS[name]))

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        model.zero_grad(set_to_none=False)

    picked = [s for k, s in enumerate(steps) if keep is None or k % 2 == keep]
    _run(model, backward, {"A" if keep is not None else name: acc}, picked, ranks)
    return acc


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    os.environ["DS_ACCELERATOR"] = "cpu"
    ema_dir = str(tmp_path_factory.mktemp("ema") / "fisher")
    return run_distributed(two_ranks, 2, ema_dir, timeout=900), run_distributed(three_ranks, 3, ema_dir, timeout=900)


@pytest.mark.timeout(1800)
def test_two_accumulators_each_equal_a_lone_run(results):
    for name in "AB":
        alone = _full(_alone(name, _steps(0, 2, MB), [0, 1]))
        for r in results[0]:
            for f in SMALL:
                assert_rel_close(r[name][f], alone[f], f"{name} {f}", tol=1e-10)


@pytest.mark.timeout(1800)
def test_named_states_each_equal_a_single_state_run(results):
    for k, state in enumerate(NAMED):
        alone = _full(_alone("C", _steps(0, 2, MB), [0, 1], keep=k))
        for r in results[0]:
            assert r["C_default_weight"] == 0
            for f in SMALL:
                assert_rel_close(r["C"][state][f], alone[f], f"{state} {f}", tol=1e-10)


@pytest.mark.timeout(1800)
def test_ema_saved_on_two_ranks_resumes_on_three(results):
    model = tiny_llama()
    acc = FisherAccumulator(model, FisherSpec(**SPECS["D"]))

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        model.zero_grad(set_to_none=False)

    _run(model, backward, {"D": acc}, _steps(0, 2, MB), [0, 1])
    _run(model, backward, {"D": acc}, _steps(N // 2, 3, 2), [0, 1, 2])
    for r in results[1]:
        for f in SMALL:
            assert_rel_close(r["D"][f], _full(acc)[f], f)
        assert 0 < r["counts"]["samples"] < N  # the counts decay with the sums
