"""DeepSpeed ZeRO-1/2/3: local statistics streamed through bucketed reduce-scatters equal the float64 oracle;
several accumulators and named states on one engine; an online (EMA) Fisher resharded 2 -> 3 ranks.

Two launches in all: every 2-rank case in one (each case builds, wraps and measures a fresh model), and
one 3-rank launch that loads what the 2 ranks saved (under FSDP1, and the EMA under ZeRO-2).
"""

from __future__ import annotations

import os
from contextlib import ExitStack

import pytest
import torch

from fisherdist.distributed.wrap import wrap_model
from fisherdist.errors import FisherdistError
from fisherdist.fisher import FisherAccumulator, FisherSpec, fisher_step
from fisherdist.fisher.checkpoint import load_fisher, save_fisher
from fisherdist.fisher.loss import per_sample_nll
from fisherdist.fisher.run import _loss
from tests.distributed import run_distributed
from tests.fisher_oracle import dataset, mean_token_nll, micro_batches, model_dtype, oracle, tiny_llama
from tests.test_fisher_engine import FULL, LORA_TARGETS, MB, N, _check, assert_rel_close, build

CASES = [  # (stage, granularity, estimator, token_weighted, peft, gradient_accumulation_steps)
    (1, "sample", "empirical", False, False, 1),
    (1, "microbatch", "empirical", False, False, 2),
    (1, "batch", "empirical", False, False, 1),
    (2, "sample", "centered", True, True, 2),
    (2, "microbatch", "rank1", True, True, 1),
    (2, "batch", "centered", False, False, 1),
    (3, "sample", "empirical", False, False, 1),
    (3, "sample", "rank1", False, True, 1),
    (3, "microbatch", "centered", False, False, 2),
    (3, "batch", "empirical", False, False, 1),
    (1, "batch", "rank1", False, False, 2),  # one read per boundary: the mean over GAS x world micro-batches
]


def _spec(case: tuple) -> dict:
    _, granularity, estimator, token_weighted, peft, _ = case
    if peft and granularity != "sample":
        params = ["*lora_A*", "*lora_B*"]  # frozen base weights have no gradient to square
    else:
        params = LORA_TARGETS if peft else FULL
    return dict(granularity=granularity, estimator=estimator, token_weighted=token_weighted, params=params)


def _run_case(rank: int, world: int, case: tuple, save_to: str | None = None) -> dict:
    """A training loop as a user writes it: record -> engine.backward -> acc.step() -> engine.step()."""
    stage, gas, peft = case[0], case[5], case[4]
    w = wrap_model(build(peft, model_dtype(f"zero{stage}")), f"zero{stage}", gradient_accumulation_steps=gas, micro_batch_size=MB,
                   reduce_bucket_size=500, allgather_bucket_size=500)  # small buckets: many buckets per backward
    # 0.05 MiB = 6553 float64 statistics per bucket: several buckets per backward, cuts inside parameters
    spec = FisherSpec(dtype="float64", bucket_mb=0.05, **_spec(case))
    acc = FisherAccumulator(w, spec)
    ids, labels = dataset(N)
    for step in micro_batches(N, world, MB):
        idx = step[rank]
        with acc.record(labels[idx]):
            nll = per_sample_nll(w.module(input_ids=ids[idx]).logits, labels[idx])
            w.backward(_loss(nll, labels[idx], torch.ones(len(idx)), spec))
        if spec.granularity != "batch" or w.module.is_gradient_accumulation_boundary():
            acc.step()
        w.step()  # optimizer (lr 0) only at the gradient-accumulation boundary
    if save_to:
        save_fisher(acc.state, save_to)
    full = {f: acc.full_fisher(f) for f in acc.targets}
    return {"full": full, "local": acc.placement.local_numel(), "total": acc.placement.total_numel(),
            "meta": acc.state.meta}


def _batch_checks(rank: int, world: int) -> tuple[str, dict]:
    """Batch granularity refuses to read ZeRO's gradient twice without an engine.step() in between, and
    ``fisher_step`` (which steps the lr-0 engine after each micro-batch) reads each step's gradient once."""
    # a recipe's raw DeepSpeed section merges over our defaults (the stage stays the backend's)
    w = wrap_model(build(False), "zero2", zero_config={"train_micro_batch_size_per_gpu": MB, "gradient_clipping": 0.0,
                                                        "zero_optimization": {"stage": 3, "reduce_bucket_size": 300}})
    ds = w.extras["deepspeed_config"]
    assert (ds["zero_optimization"], ds["train_batch_size"]) == ({"stage": 2, "reduce_bucket_size": 300,
                                                                  "allgather_bucket_size": 50_000_000}, MB * world)
    assert w.module.zero_optimization_stage() == 2 and w.module.train_batch_size() == MB * world
    spec = FisherSpec(dtype="float64", granularity="batch", params=FULL)
    acc = FisherAccumulator(w, spec)
    ids, labels = dataset(N)
    error = "no error"
    try:
        for step in micro_batches(N, world, MB):  # a user loop that forgets engine.step()
            idx = step[rank]
            with acc.record(labels[idx]):
                nll = per_sample_nll(w.module(input_ids=ids[idx]).logits, labels[idx])
                w.backward(_loss(nll, labels[idx], torch.ones(len(idx)), spec))
            acc.step()
    except FisherdistError as err:
        error = str(err)
    acc.close()
    w = wrap_model(build(False), "zero2", micro_batch_size=MB)
    acc = FisherAccumulator(w, spec)
    for step in micro_batches(N, world, MB):
        fisher_step(w, acc, {"input_ids": ids[step[rank]], "labels": labels[step[rank]]})
    return error, {f: acc.full_fisher(f) for f in acc.targets}


# -- several statistics on one engine, and an online Fisher that reshards (ZeRO-2) --------------------------
SMALL = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
MULTI = {"A": dict(params=SMALL, dtype="float64", bucket_mb=0.01),
         "B": dict(params=SMALL, dtype="float64", granularity="microbatch", estimator="rank1"),
         "C": dict(params=SMALL, dtype="float64"),
         "D": dict(params=SMALL, dtype="float64", decay=0.6)}
NAMED = ("forget", "retain")
MULTI_N = 24  # samples 0..11 on 2 ranks x 3 (two optimizer steps), 12..23 (EMA only) on 3 ranks x 2


def _multi_steps(lo: int, world: int, mb: int) -> list[list[list[int]]]:
    return [[[lo + i for i in idx] for idx in step] for step in micro_batches(MULTI_N // 2, world, mb)]


def _multi_run(model, backward, accs: dict, steps: list, ranks: list[int]) -> None:
    """Per optimizer step: the listed ranks' micro-batches (one each on a real rank, all of them in one
    process), recorded by every accumulator (C into the step's named state); then each ``acc.step()``."""
    ids, labels = dataset(MULTI_N)
    for k, step in enumerate(steps):
        for r in ranks:
            idx = step[r]
            with ExitStack() as stack:
                for name, acc in accs.items():
                    stack.enter_context(acc.record(labels[idx], state=NAMED[k % 2] if name == "C" else "default"))
                backward(mean_token_nll(model(input_ids=ids[idx]).logits, labels[idx]).sum())
        for acc in accs.values():
            acc.step()


def _on_zero(rank: int, names: str, steps: list, load: str | None = None, stage: int = 2) -> dict:
    """A live ZeRO engine (gradients dropped, no optimizer step) carrying the accumulators ``names``."""
    w = wrap_model(tiny_llama(dtype=model_dtype(f"zero{stage}")), f"zero{stage}", micro_batch_size=3)
    accs = {n: FisherAccumulator(w, FisherSpec(**MULTI[n])) for n in names}
    if load:
        load_fisher(accs["D"].state, load)

    def backward(loss: torch.Tensor) -> None:
        w.backward(loss)
        w.clear_grads()

    _multi_run(w.module, backward, accs, steps, [rank])
    return accs


def _full(acc: FisherAccumulator, state: str = "default") -> dict[str, torch.Tensor]:
    return {f: acc.full_fisher(f, state=state) for f in SMALL}


def two_rank_accumulators(rank: int, world: int, ema: str) -> dict:
    accs = _on_zero(rank, "ABCD", _multi_steps(0, world, 3))
    save_fisher(accs["D"].state, ema)
    return {2: _multi_result(accs), **{stage: _multi_result(_on_zero(rank, "ABC", _multi_steps(0, world, 3), stage=stage))
                                       for stage in (1, 3)}}


def _multi_result(accs: dict) -> dict:
    return {"A": _full(accs["A"]), "B": _full(accs["B"]), "C": {s: _full(accs["C"], s) for s in NAMED},
            "C_default_weight": accs["C"].state.global_counts()["weight"]}


def three_rank_ema(rank: int, world: int, ema: str) -> dict:
    accs = _on_zero(rank, "D", _multi_steps(MULTI_N // 2, world, 2), load=ema)
    return {"full": _full(accs["D"]), "counts": accs["D"].state.global_counts()}


def lone_run(name: str, keep: int | None = None, resumed: bool = False) -> dict[str, torch.Tensor]:
    """Accumulator ``name`` alone in one process over both ranks' micro-batches; ``keep``: only the steps of
    that parity (one named state, recorded as the default state); ``resumed``: then the 3-rank steps too."""
    model = tiny_llama()
    acc = FisherAccumulator(model, FisherSpec(**MULTI[name]))

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        model.zero_grad(set_to_none=False)

    steps = [s for k, s in enumerate(_multi_steps(0, 2, 3)) if keep is None or k % 2 == keep]
    _multi_run(model, backward, {"A" if keep is not None else name: acc}, steps, [0, 1])
    if resumed:
        _multi_run(model, backward, {name: acc}, _multi_steps(MULTI_N // 2, 3, 2), [0, 1, 2])
    return _full(acc)


def _two_ranks(rank: int, world: int, ckpt: str, ema: str) -> dict:
    """Every 2-rank check in ONE launch; the fp16 patch last (it changes DeepSpeed's accelerator class)."""
    return {"cases": [_run_case(rank, world, case, ckpt if k == 0 else None) for k, case in enumerate(CASES)],
            "batch": _batch_checks(rank, world), "multi": two_rank_accumulators(rank, world, ema),
            "fp16": _zero3_where_the_cpu_reports_fp16(rank, world)}


def _three_ranks(rank: int, world: int, ckpt: str, ema: str) -> dict:
    """Load a ZeRO checkpoint (irregular fragments, 2 ranks) into FSDP1 (other fragments, 3 ranks); resume
    the 2-rank EMA on 3 ZeRO-2 ranks."""
    w = wrap_model(build(CASES[0][4]), "fsdp1")
    acc = FisherAccumulator(w, FisherSpec(dtype="float64", **_spec(CASES[0])))
    load_fisher(acc.state, ckpt)
    return {"fsdp1": {f: acc.full_fisher(f) for f in acc.targets}, "ema": three_rank_ema(rank, world, ema)}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    os.environ["DS_ACCELERATOR"] = "cpu"  # inherited by the spawned ranks
    tmp = tmp_path_factory.mktemp("zero")
    ckpt, ema = str(tmp / "fisher"), str(tmp / "ema")
    return run_distributed(_two_ranks, 2, ckpt, ema, timeout=900), run_distributed(_three_ranks, 3, ckpt, ema, timeout=600)


def check_cases(out: list[dict]) -> list[list[dict]]:
    results = [r["cases"] for r in out]
    assert all("call engine.step()" in r["batch"][0] for r in out), [r["batch"][0] for r in out]
    via_fisher_step = out[0]["batch"][1]
    _check({"full": via_fisher_step}, False, {"granularity": "batch", "estimator": "empirical"}, 2)
    for k, case in enumerate(CASES):
        assert results[0][k]["meta"]["backend"] == f"zero{case[0]}"
        assert results[0][k]["meta"]["grad_scale"] == case[5]
        if case[1] == "batch" and case[5] > 1:  # the oracle's "batch" = one boundary = MB x GAS samples per rank
            ref = oracle(build(case[4]), *dataset(N), list(results[0][k]["full"]), "batch", case[2], 2, MB * case[5])
            for n, got in results[0][k]["full"].items():
                assert_rel_close(got, ref[n].reshape(got.shape), n)
        else:
            _check(results[0][k], case[4], _spec(case), 2)
        locals_ = [r[k]["local"] for r in results]
        assert sum(locals_) == results[0][k]["total"], (case, locals_)  # every element stored exactly once
        assert max(locals_) <= results[0][k]["total"] / 2 + 64, (case, locals_)  # ~1/N (+ partition padding)
    return results


@pytest.mark.timeout(1600)
def test_zero_stages_match_oracle(launched):
    results = check_cases(launched[0])
    # topology independence: the ZeRO-1 state written by 2 ranks loads into FSDP1 on 3 ranks unchanged
    assert CASES[0][0] == 1
    for fqn, got in launched[1][0]["fsdp1"].items():
        assert_rel_close(got, results[0][0]["full"][fqn], f"{fqn} reloaded under fsdp1", tol=1e-12)


@pytest.mark.timeout(1600)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_accumulators_and_named_states_each_equal_a_lone_run(launched, stage):
    """On one ZeRO engine: ``A`` (sample, tiny buckets) and ``B`` (micro-batch rank-1) each equal the same
    accumulator alone in one process; ``C``'s two named states each equal a single-state run on that
    state's steps alone, and its default state stays empty. ZeRO-3 runs a float32 model (float64 oracle)."""
    tol = 1e-4 if stage == 3 else 1e-10
    for name in "AB":
        alone = lone_run(name)
        for r in launched[0]:
            for f in SMALL:
                assert_rel_close(r["multi"][stage][name][f], alone[f], f"{name} {f}", tol=tol)
    for k, state in enumerate(("forget", "retain")):
        alone = lone_run("C", keep=k)
        for r in launched[0]:
            assert r["multi"][stage]["C_default_weight"] == 0
            for f in SMALL:
                assert_rel_close(r["multi"][stage]["C"][state][f], alone[f], f"{state} {f}", tol=tol)


@pytest.mark.timeout(1600)
def test_ema_saved_on_two_ranks_resumes_on_three(launched):
    """``D`` (decay 0.6) saved by 2 ZeRO-2 ranks, loaded by 3 and continued: equal to one process running
    the same optimizer steps uninterrupted (the EMA formula itself is checked in test_fisher_exact)."""
    want = lone_run("D", resumed=True)
    for r in launched[1]:
        for f in SMALL:
            assert_rel_close(r["ema"]["full"][f], want[f], f)
        assert 0 < r["ema"]["counts"]["samples"] < 24  # the counts decay with the sums


def _zero3_where_the_cpu_reports_fp16(rank: int, world: int) -> dict:
    """Make DeepSpeed's CPU accelerator report fp16 support, as it does on CPUs with avx512_fp16."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero import Init

    type(get_accelerator()).is_fp16_supported = lambda self: True
    assert get_accelerator().is_fp16_supported()
    try:  # the failure a fresh machine with fp16 showed: zero.Init asserts on a float64 model
        with Init(module=tiny_llama(dtype=torch.float64), dtype=torch.float64):
            pass
        deepspeed_error = "no error"
    except AssertionError as err:
        deepspeed_error = str(err)
    try:
        wrap_model(tiny_llama(dtype=torch.float64), "zero3", micro_batch_size=MB)
        ours = "no error"
    except FisherdistError as err:
        ours = str(err)
    w = wrap_model(tiny_llama(dtype=model_dtype("zero3")), "zero3", micro_batch_size=MB)  # what the tests use
    acc = FisherAccumulator(w, FisherSpec(dtype="float64", granularity="sample", params=FULL))
    ids, labels = dataset(N)
    for step in micro_batches(N, world, MB):
        fisher_step(w, acc, {"input_ids": ids[step[rank]], "labels": labels[step[rank]]})
    return {"deepspeed": deepspeed_error, "ours": ours, "full": {f: acc.full_fisher(f) for f in acc.targets}}


@pytest.mark.timeout(1600)
def test_zero3_on_a_cpu_with_fp16_support(launched):
    out = launched[0][0]["fp16"]
    assert "Invalid data type torch.float64" in out["deepspeed"], out["deepspeed"]  # the patch reproduces it
    assert out["ours"] == ("dist.backend=zero3: model dtype torch.float64 is not supported by DeepSpeed ZeRO-3 "
                           "(use float32 or bfloat16)")
    _check(out, False, {"granularity": "sample", "estimator": "empirical"}, 2)  # float32 model, float64 oracle
