"""DeepSpeed ZeRO-1/2/3: local statistics streamed through bucketed reduce-scatters equal the float64 oracle.

Every DeepSpeed case runs in ONE 2-rank launch (DeepSpeed's first start JIT-builds a small op, ~45 s,
cached afterwards); each case builds, wraps and measures a fresh model.
"""

from __future__ import annotations

import os

import torch

from fisherdist.distributed.wrap import wrap_model
from fisherdist.errors import FisherdistError
from fisherdist.fisher import FisherAccumulator, FisherSpec, fisher_step
from fisherdist.fisher.checkpoint import load_fisher, save_fisher
from fisherdist.fisher.run import _loss
from fisherdist.fisher.loss import per_sample_nll
from tests.distributed import run_distributed
from tests.fisher_oracle import dataset, micro_batches, model_dtype, oracle, tiny_llama
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


def _all_cases(rank: int, world: int, cases: list[tuple], ckpt: str | None) -> tuple[list[dict], tuple[str, dict]]:
    results = [_run_case(rank, world, case, ckpt if k == 0 else None) for k, case in enumerate(cases)]
    return results, _batch_checks(rank, world)


def _load_under_fsdp1(rank: int, world: int, case: tuple, ckpt: str) -> dict[str, torch.Tensor]:
    """Load a ZeRO checkpoint (irregular fragments, 2 ranks) into FSDP1 (other fragments, ``world`` ranks)."""
    w = wrap_model(build(case[4]), "fsdp1")
    acc = FisherAccumulator(w, FisherSpec(dtype="float64", **_spec(case)))
    load_fisher(acc.state, ckpt)
    return {f: acc.full_fisher(f) for f in acc.targets}


def check_cases(cases: list[tuple], ckpt: str | None = None) -> list[dict]:
    os.environ["DS_ACCELERATOR"] = "cpu"  # inherited by the spawned ranks
    out = run_distributed(_all_cases, 2, cases, ckpt, timeout=900)
    results = [r[0] for r in out]
    assert all("call engine.step()" in r[1][0] for r in out), [r[1][0] for r in out]
    via_fisher_step = out[0][1][1]
    _check({"full": via_fisher_step}, False, {"granularity": "batch", "estimator": "empirical"}, 2)
    for k, case in enumerate(cases):
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


def test_zero_stages_match_oracle(tmp_path):
    results = check_cases(CASES, str(tmp_path / "fisher"))
    # topology independence: the ZeRO-1 state written by 2 ranks loads into FSDP1 on 3 ranks unchanged
    assert CASES[0][0] == 1
    loaded = run_distributed(_load_under_fsdp1, 3, CASES[0], str(tmp_path / "fisher"), timeout=120)[0]
    for fqn, got in loaded.items():
        assert_rel_close(got, results[0][0]["full"][fqn], f"{fqn} reloaded under fsdp1", tol=1e-12)


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


def test_zero3_on_a_cpu_with_fp16_support():
    os.environ["DS_ACCELERATOR"] = "cpu"
    out = run_distributed(_zero3_where_the_cpu_reports_fp16, 2, timeout=240)[0]
    assert "Invalid data type torch.float64" in out["deepspeed"], out["deepspeed"]  # the patch reproduces it
    assert out["ours"] == ("dist.backend=zero3: model dtype torch.float64 is not supported by DeepSpeed ZeRO-3 "
                           "(use float32 or bfloat16)")
    _check(out, False, {"granularity": "sample", "estimator": "empirical"}, 2)  # float32 model, float64 oracle
