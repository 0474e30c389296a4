"""FILA / VILA maths on one process against independent references: the row importance against the float64
oracle (tests/fisher_oracle.py computes every per-sample loss and gradient itself), forget + retain states
of one pass against two separate passes, the randomized SVD against a dense SVD, and the Fisher-weighted
initialisation leaving the model's outputs unchanged."""

from __future__ import annotations

import pytest
import torch

from fisherdist.distributed.wrap import wrap_model
from fisherdist.fisher import FisherAccumulator
from fisherdist.methods.vila.importance import EPS, SUFFIX, importance_spec, one_pass, row_importance
from fisherdist.methods.vila.init import _RowSharded, fisher_init, gaussian_init, lowrank_svd
from fisherdist.models.peft_utils import LoraSettings, adapted_modules, apply_lora
from tests.fisher_oracle import dataset, micro_batches, oracle, padded, tiny_llama

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, targets=["q_proj", "down_proj"])
MB = 3


def _model():
    model = apply_lora(tiny_llama(0), LORA)
    gaussian_init(0.05, seed=3)(model)  # VILA's pass: both factors non-zero
    return model


def _batches(ids, labels):
    out = []
    for (idx,) in micro_batches(ids.shape[0], 1, MB):
        rows, valid = padded(idx, MB)  # an uneven last micro-batch, topped up with invalid rows
        out.append({"input_ids": ids[rows], "attention_mask": torch.ones_like(ids[rows]), "labels": labels[rows],
                    "valid": valid})
    return out


DATA = {"forget": dataset(7, seed=11), "retain": dataset(8, seed=12)}  # ragged lengths


def _acc(method, model):
    w = wrap_model(model, "none")
    return w, FisherAccumulator(w, importance_spec(method, LORA, dtype="float64"))


@pytest.mark.parametrize("method", ["fila", "vila"])
def test_row_importance_matches_the_float64_oracle(method):
    model = _model()
    w, acc = _acc(method, model)
    one_pass(w, acc, _batches(*DATA["forget"]), _batches(*DATA["retain"]))
    got = row_importance(method, acc)
    names = sorted(acc.targets)
    estimator = "centered" if method == "vila" else "empirical"
    want_f, want_r = (oracle(model, *DATA[s], names, "microbatch", estimator, 1, MB, token_weighted=True) for s in ("forget", "retain"))
    for m in adapted_modules(model):
        if method == "fila":
            key = m.name + SUFFIX["fila"][0]
            want = (want_f[key] / (EPS + want_r[key])).sum(1)
        else:
            a, b = (m.name + s for s in SUFFIX["vila"])
            want = ((want_f[b] @ want_f[a]) / (EPS + want_r[b] @ want_r[a])).sum(1)
        torch.testing.assert_close(got[m.name], want, rtol=1e-6 if method == "vila" else 1e-7, atol=0)  # centered: cancellation
    assert len(got) == 4  # q_proj and down_proj of 2 layers


@pytest.mark.parametrize("method", ["fila", "vila"])
def test_one_pass_two_states_equals_two_passes(method):
    model = _model()
    w, acc = _acc(method, model)
    one_pass(w, acc, _batches(*DATA["forget"]), _batches(*DATA["retain"]))
    assert set(acc.states) == {"forget", "retain"}  # the unused default state is never allocated
    for state in ("forget", "retain"):
        w2, alone = _acc(method, model)
        one_pass(w2, alone, _batches(*DATA[state]) if state == "forget" else [], [] if state == "forget" else _batches(*DATA[state]))
        for fqn in acc.targets:
            torch.testing.assert_close(acc.fisher(fqn, state=state), alone.fisher(fqn, state=state), rtol=1e-12, atol=0)
        assert acc.states[state].global_counts() == alone.states[state].global_counts()
        alone.close()


def test_randomized_svd_matches_a_dense_svd():
    g = torch.Generator().manual_seed(0)
    w, rho = torch.randn(20, 12, generator=g, dtype=torch.float64), torch.rand(20, generator=g, dtype=torch.float64) + 0.1
    u, s, v = lowrank_svd(_RowSharded(w, rho), 12, 3, oversample=100)  # q = every column: exact
    uu, ss, vvt = torch.linalg.svd(rho[:, None] * w, full_matrices=False)
    torch.testing.assert_close(s, ss[:3])
    torch.testing.assert_close(u * s @ v.T, uu[:, :3] * ss[:3] @ vvt[:3])


def test_fisher_init_keeps_the_outputs_and_weights_rows():
    model = apply_lora(tiny_llama(0), LORA)
    ids = DATA["forget"][0][:2]
    before = model(input_ids=ids).logits.detach()
    rows = {m.name: torch.rand(m.lora_b.shape[0], dtype=torch.float64) for m in adapted_modules(model)}
    originals = {m.name: m.module.base_layer.weight.detach().clone() for m in adapted_modules(model)}
    fisher_init(rows)(model)
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), before, rtol=1e-9, atol=1e-10)
    for m in adapted_modules(model):
        delta = 2.0 * m.lora_b.detach() @ m.lora_a.detach()  # s = alpha / r = 2
        torch.testing.assert_close(m.module.base_layer.weight.detach() + delta, originals[m.name])
        assert delta.abs().sum() > 0


def test_default_state_is_created_on_first_read():
    w, acc = _acc("fila", _model())
    assert not acc.states
    assert acc.num_samples() == 0  # a read allocates the default state, zero as before the change
    assert set(acc.states) == {"default"}
    acc.close()
