"""Single-process exactness against the independent oracle: uneven last micro-batches at every granularity,
the true Fisher (seed-reproduced draws, Monte-Carlo against its exact expectation), pseudo labels, counts
under mc_samples and gradient accumulation, frozen targets at micro-batch granularity, named states, the
online (EMA) Fisher and per-matrix summaries."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors import safe_open

from fisherdist.config import Section, load_config
from fisherdist.distributed.wrap import wrap_model
from fisherdist.errors import ConfigError
from fisherdist.fisher import FisherAccumulator, FisherSpec
from fisherdist.fisher.checkpoint import load_fisher, save_fisher
from tests.fisher_oracle import dataset, exact_true_fisher, mean_token_nll, micro_batches, oracle, tiny_llama, units
from tests.test_fisher_engine import FULL, LORA_TARGETS, MB, _check, assert_rel_close, build, feed, run_engine

RAGGED = 10  # 4 micro-batches of 3: the last holds one sample and two invalid top-up rows
SMALL = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]


def tokens_of(n: int) -> float:
    return float((dataset(n)[1][:, 1:] != -100).sum())


@pytest.mark.parametrize("spec", [
    dict(granularity="sample", estimator="empirical"),
    dict(granularity="microbatch", estimator="centered", token_weighted=True),
    dict(granularity="batch", estimator="empirical"),
    dict(granularity="sample", estimator="true", mc_samples=3),  # seed-reproduced draws
    dict(granularity="microbatch", estimator="pseudo"),
    dict(granularity="microbatch", estimator="empirical", params=LORA_TARGETS),  # frozen base weights
], ids=["sample", "microbatch-tw", "batch", "true-mc3", "pseudo", "frozen-microbatch"])
def test_uneven_data_and_every_estimator_match_oracle(spec):
    spec = {"params": FULL, **spec}
    peft = spec["params"] is LORA_TARGETS
    result = run_engine(0, 1, "none", spec, peft, n=RAGGED)
    _check(result, peft, spec, 1, n=RAGGED)
    # padding never counts; M Monte-Carlo draws count each sample once (the resume position)
    assert result["counts"]["samples"] == RAGGED and result["counts"]["tokens"] == tokens_of(RAGGED)


def test_true_fisher_converges_to_its_exact_expectation():
    """Engine Monte-Carlo (M draws) against the exact expectation over a 6-token vocabulary: the error
    shrinks like 1/sqrt(M); the empirical Fisher of the same data is far from it (the test can fail)."""
    vocab, n, m = 6, 2, 120
    model = tiny_llama(vocab=vocab)
    ids, labels = dataset(n, vocab=vocab, seq=6)
    names = ["model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    exact = exact_true_fisher(model, ids, labels, names)
    errors = {}
    for estimator, draws in (("true", m), ("empirical", 1)):
        acc = FisherAccumulator(model, FisherSpec(estimator=estimator, mc_samples=draws, params=names, dtype="float64"))
        from fisherdist.fisher import fisher_step

        fisher_step(model, acc, {"input_ids": ids, "labels": labels}, torch.Generator().manual_seed(0))
        errors[estimator] = max(((acc.full_fisher(k) - exact[k]).norm() / exact[k].norm()).item() for k in names)
        assert acc.state.global_counts()["samples"] == n
        acc.close()
    assert errors["true"] < 0.15 < 0.5 < errors["empirical"], errors


def test_gradient_accumulation_counts_every_micro_batch():
    """batch granularity, 4 micro-batches per optimizer step: all samples and tokens count, and the squared
    gradient is that of the step's mean loss."""
    model = tiny_llama()
    acc = FisherAccumulator(model, FisherSpec(granularity="batch", params=SMALL, dtype="float64"))
    n = 12
    ids, labels = dataset(n)
    for step in micro_batches(n, 4, MB):
        for idx in step:
            with acc.record(labels[idx]):
                (mean_token_nll(model(input_ids=ids[idx]).logits, labels[idx]).mean() / 4).backward()
        acc.step()
    counts = acc.state.global_counts()
    assert counts["samples"] == n and counts["tokens"] == tokens_of(n) and counts["weight"] == 1
    ref = oracle(tiny_llama(), ids, labels, SMALL, "batch", "empirical", 4, MB)
    for k in SMALL:
        assert_rel_close(acc.full_fisher(k), ref[k], k)


class FisherOnly(Section):
    fisher: FisherSpec


def test_estimator_true_from_yaml(tmp_path):
    """YAML reads ``estimator: true`` as a boolean; it names the true Fisher (file and override)."""
    cfg = tmp_path / "f.yaml"
    cfg.write_text("fisher: {estimator: true}\n")
    assert load_config(FisherOnly, cfg).fisher.estimator == "true"
    assert load_config(FisherOnly, None, ["fisher.estimator=true"]).fisher.estimator == "true"
    with pytest.raises(ConfigError, match="fisher.estimator"):
        load_config(FisherOnly, None, ["fisher.estimator=false"])


def _record(acc: FisherAccumulator, model, ids, labels, state: str) -> None:
    with acc.record(labels, state=state):
        mean_token_nll(model(input_ids=ids).logits, labels).sum().backward()
    acc.step()
    model.zero_grad(set_to_none=True)


def test_named_states_each_equal_their_own_data():
    """One accumulator, micro-batches alternating between "forget" and "retain": each state equals the oracle
    on its own micro-batches, and the default state stays empty."""
    model = tiny_llama()
    acc = FisherAccumulator(model, FisherSpec(params=SMALL, dtype="float64"))
    ids, labels = dataset(12)
    split = {"forget": [], "retain": []}
    for k, (idx,) in enumerate(micro_batches(12, 1, MB)):
        name = ("forget", "retain")[k % 2]
        split[name] += idx
        _record(acc, model, ids[idx], labels[idx], name)
    for name, idx in split.items():
        ref = oracle(tiny_llama(), ids[idx], labels[idx], SMALL, "sample", "empirical", 1, MB)
        assert acc.states[name].global_counts()["samples"] == len(idx)
        for k in SMALL:
            assert_rel_close(acc.full_fisher(k, state=name), ref[k], f"{name} {k}")
    assert acc.state.global_counts()["weight"] == 0


def test_online_fisher_is_the_bias_corrected_ema(tmp_path):
    """decay=b: after step t the read-out is sum_k b^(t-k) S_k / sum_k b^(t-k) W_k (S_k: the step's sum of
    squared per-sample gradients, W_k its samples), at every step; the state checkpoints like any other."""
    beta = 0.6
    model = tiny_llama()
    acc = FisherAccumulator(model, FisherSpec(params=SMALL, dtype="float64", decay=beta))
    ids, labels = dataset(RAGGED)
    sums, weights = {k: 0.0 for k in SMALL}, 0.0
    for (idx,) in micro_batches(RAGGED, 1, MB):
        _record(acc, model, ids[idx], labels[idx], "default")
        found = units(tiny_llama(), ids[idx], labels[idx], SMALL, "sample", "empirical", 1, len(idx))
        sums = {k: beta * sums[k] + sum(g[k] ** 2 for _, g in found) for k in SMALL}
        weights = beta * weights + len(found)
        for k in SMALL:
            assert_rel_close(acc.full_fisher(k), sums[k] / weights, k)
    save_fisher(acc.state, tmp_path / "ema")
    again = FisherAccumulator(tiny_llama(), FisherSpec(params=SMALL, dtype="float64", decay=beta))
    load_fisher(again.state, tmp_path / "ema")
    for k in SMALL:
        assert_rel_close(again.full_fisher(k), sums[k] / weights, k)


def test_summaries_match_dense_and_export(tmp_path):
    """Row sums, column sums and totals from the fragments equal a dense float64 computation, in the
    accumulator and in ``fisherdist export --summary``."""
    model = build(False)
    acc = FisherAccumulator(wrap_model(model, "none"), FisherSpec(params=SMALL + ["model.norm.weight"], dtype="float64"))
    feed(wrap_model(model, "none"), acc, 0, 1, RAGGED)
    got = acc.summary()
    save_fisher(acc.state, tmp_path / "fisher")
    from fisherdist import cli

    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "s.safetensors"), "--summary"]) == 0
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
    for k in acc.targets:
        dense = acc.full_fisher(k).reshape(acc.placement.shapes[k][0], -1)
        for key, want in (("row", dense.sum(1)), ("col", dense.sum(0)), ("total", dense.sum().reshape(1))):
            torch.testing.assert_close(got[f"{k}.{key}"], want, rtol=1e-10, atol=0)
            torch.testing.assert_close(exported[f"{k}.{key}"], want, rtol=1e-6, atol=0)  # saved float32 sums


def test_two_sample_accumulators_on_one_model_each_equal_a_lone_one():
    """Only one collector can swap a Linear's forward for the fused per-sample path; a second accumulator
    on the same module takes the hook path, and both equal a lone accumulator (closing leaves no swap)."""
    ids, labels = dataset(RAGGED)

    def run(n: int) -> list[dict[str, torch.Tensor]]:
        model = tiny_llama()
        accs = [FisherAccumulator(model, FisherSpec(params=SMALL, dtype="float64")) for _ in range(n)]
        for (idx,) in micro_batches(RAGGED, 1, MB):
            with contextlib.ExitStack() as stack:
                for acc in accs:
                    stack.enter_context(acc.record(labels[idx]))
                mean_token_nll(model(input_ids=ids[idx]).logits, labels[idx]).sum().backward()
            for acc in accs:
                acc.step()
            model.zero_grad(set_to_none=True)
        assert not any("forward" in vars(m) for m in model.modules())
        return [{k: acc.full_fisher(k) for k in SMALL} for acc in accs]

    (lone,) = run(1)
    for got in run(2):
        for k in SMALL:
            assert_rel_close(got[k], lone[k], k, tol=1e-12)


class _Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        self.ids, self.labels = dataset(n)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_online_fisher_in_a_trainer_decays_per_optimizer_step(tmp_path):
    """``decay`` inside a real ``transformers.Trainer`` (FisherCallback, gradient accumulation 2, lr 0): the
    EMA moves once per optimizer step, not per micro-batch; the read-out equals the formula over the
    Trainer's own batches, each sample's gradient computed by the oracle."""
    from transformers import Trainer, TrainingArguments

    from fisherdist.fisher.checkpoint import read_fisher
    from fisherdist.fisher.export import mean_fisher
    from fisherdist.integrations.hf import FisherCallback

    beta, rows, model = 0.5, _Rows(12), tiny_llama()
    fed: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].clone()), with_kwargs=True)
    cb = FisherCallback(spec=FisherSpec(params=SMALL, dtype="float64", decay=beta), save_dir=tmp_path / "export")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                             learning_rate=0.0, use_cpu=True, report_to=[], max_steps=2, save_strategy="no", seed=3)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb]).train()
    assert len(fed) == 4  # two optimizer steps of two micro-batches
    sums, weights = {k: 0.0 for k in SMALL}, 0.0
    for step in (fed[0:2], fed[2:4]):
        idx = [int((rows.ids == r).all(1).nonzero()) for batch in step for r in batch]
        found = units(tiny_llama(), rows.ids[idx], rows.labels[idx], SMALL, "sample", "empirical", 1, len(idx))
        sums = {k: beta * sums[k] + sum(g[k] ** 2 for _, g in found) for k in SMALL}
        weights = beta * weights + len(found)
    stats, counts, meta = read_fisher(tmp_path / "export" / "fisher")
    assert counts["weight"] == pytest.approx(weights)  # the counts decay with the sums
    got = mean_fisher(stats, "empirical", counts["weight"])
    for k in SMALL:  # the Trainer's loss runs in float32 (HF upcasts the logits to float32, not float64)
        want = sums[k] / weights
        torch.testing.assert_close(got[k].reshape(want.shape), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
