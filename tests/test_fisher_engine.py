"""The engine equals an independent float64 per-sample oracle, for every granularity x estimator that makes
sense, on full-parameter and PEFT (frozen base + LoRA) targets: one process, and FSDP2 / ZeRO on one rank.
The shared helpers (``run_engine``, ``run_all_cases``, ``_check``) also serve the 2-rank DDP / FSDP2 cases,
which run inside the one launch of ``tests/test_fisher_layouts.py``."""

from __future__ import annotations

import pytest
import torch

from fisherdist.distributed.wrap import wrap_model
from fisherdist.fisher import FisherAccumulator, FisherSpec, fisher_step
from tests.distributed import run_distributed
from tests.fisher_oracle import dataset, micro_batches, oracle, padded, tiny_llama

N, MB = 12, 3
FULL = ["model.embed_tokens.weight", "model.layers.*", "model.norm.weight", "lm_head.weight"]
LORA_TARGETS = ["*q_proj.base_layer.weight", "*v_proj.base_layer.weight", "*lora_A*", "*lora_B*"]


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in peft_model.named_parameters():  # non-zero B so the LoRA path carries gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


def build(peft: bool, dtype: torch.dtype = torch.float64):
    """The float64 model, cast afterwards: the same weights in every dtype (random draws differ by dtype)."""
    model = tiny_llama()
    return (lora(model) if peft else model).to(dtype)


def feed(w, acc, rank: int, world: int, n: int = N, mb: int = MB) -> None:
    """This rank's micro-batches as the data loader makes them: an uneven last step is topped up with
    invalid rows; true-Fisher labels come from the rank's generator (seed + rank, as the oracle draws)."""
    ids, labels = dataset(n)
    generator = torch.Generator().manual_seed(acc.spec.seed + rank)
    for step in micro_batches(n, world, mb):
        rows, valid = padded(step[rank], mb)
        fisher_step(w, acc, {"input_ids": ids[rows], "labels": labels[rows], "valid": valid}, generator)


def run_engine(rank: int, world: int, backend: str, spec_kwargs: dict, peft: bool, n: int = N) -> dict:
    model = build(peft)
    w = wrap_model(model, backend if world > 1 else "none")
    spec = FisherSpec(dtype="float64", **spec_kwargs)
    acc = FisherAccumulator(w, spec)
    feed(w, acc, rank, world, n)
    full = {f: acc.full_fisher(f) for f in acc.targets}
    return {"full": full, "local": acc.placement.local_numel(), "total": acc.placement.total_numel(),
            "counts": acc.state.global_counts()}


CASES = [
    ("sample", "empirical", False),
    ("sample", "centered", True),
    ("microbatch", "empirical", False),
    ("microbatch", "rank1", True),
    ("batch", "empirical", False),
]


def assert_rel_close(got: torch.Tensor, ref: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    """Norm-wise relative error: HF's RMSNorm computes in float32 even in a float64 model, so single
    entries that cancel to ~0 carry float32 rounding; the tensor as a whole must match to ``tol``."""
    assert ref.norm() > 0, f"{name}: oracle is all zeros, the comparison would prove nothing"
    err = ((got - ref).norm() / ref.norm()).item()
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def _check(result: dict, peft: bool, spec_kwargs: dict, world: int, n: int = N) -> None:
    model = build(peft)
    names = list(result["full"])
    ref = oracle(model, *dataset(n), names, spec_kwargs["granularity"], spec_kwargs.get("estimator", "empirical"),
                 world, MB, spec_kwargs.get("token_weighted", False), spec_kwargs.get("mc_samples", 1))
    for n in names:
        assert_rel_close(result["full"][n], ref[n].reshape(result["full"][n].shape), n)


@pytest.mark.parametrize("granularity,estimator,token_weighted", CASES)
def test_single_process_matches_oracle(granularity, estimator, token_weighted):
    spec = dict(granularity=granularity, estimator=estimator, token_weighted=token_weighted, params=FULL)
    # single process with "world" 2 splits: the oracle's micro-batches are what one process sees in turn.
    result = run_engine(0, 1, "none", spec, False)
    _check(result, False, spec, 1)


def _params(granularity: str, peft: bool) -> list[str]:
    if peft and granularity in ("microbatch", "batch"):
        return ["*lora_A*", "*lora_B*"]  # frozen base weights have no gradient to square
    return LORA_TARGETS if peft else FULL


def run_all_cases(rank: int, world: int) -> dict:
    """Every case on DDP and FSDP2 in one process group (spawning is the slow part on 2 cores)."""
    out = {}
    for backend in ("ddp", "fsdp2"):
        for granularity, estimator, token_weighted in CASES:
            for peft in (False, True):
                spec = dict(granularity=granularity, estimator=estimator, token_weighted=token_weighted,
                            params=_params(granularity, peft))
                out[(backend, granularity, estimator, token_weighted, peft)] = run_engine(rank, world, backend, spec, peft)
    return out


def _one_rank(rank: int, world: int) -> dict:
    """FSDP2 on a single rank never calls its reduce-scatter hook, and ZeRO has nothing to reduce: the
    engine adds local statistics straight into the sums there."""
    out = {}
    for backend in ("fsdp2", "zero2"):
        for granularity in ("sample", "microbatch"):
            w = wrap_model(build(False), backend, micro_batch_size=MB)
            acc = FisherAccumulator(w, FisherSpec(dtype="float64", granularity=granularity, params=FULL))
            feed(w, acc, rank, world)
            out[backend, granularity] = {"full": {f: acc.full_fisher(f) for f in acc.targets}}
    return out


def test_one_rank_fsdp2_and_zero_match_oracle(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    (result,) = run_distributed(_one_rank, 1, timeout=400)
    for (_backend, granularity), r in result.items():
        _check(r, False, dict(granularity=granularity, params=FULL), 1)
