"""TOFU metrics against hand-computed values, the exact KS p-value of disjoint samples, and the HF loss
(the model computes each answer's mean NLL itself, from ``labels``)."""

from __future__ import annotations

import math
from math import comb

import pytest
import torch

from fisherdist.eval import tofu
from fisherdist.eval.generation import HFGenerator
from tests.tiny_hf import build_model_dir


def test_truth_ratio_and_aggregates_by_hand():
    # P_para = e^-1, P_pert = exp(-(2 + 3) / 2): R = e^{1 - 2.5}
    r = tofu.truth_ratio(1.0, [2.0, 3.0])
    assert r == pytest.approx(math.exp(-1.5))
    assert tofu.forget_truth_ratio([0.5, 2.0, 1.0]) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert tofu.retain_truth_ratio([0.25, 2.0, 1.0]) == pytest.approx((0.75 + 0 + 0) / 3)
    assert tofu.probability(math.log(4)) == pytest.approx(0.25)


def test_rouge_l_recall_by_hand():
    # LCS("the cat sat on the mat", "the cat on mat") = 4 of the reference's 6 words
    assert tofu.rouge_l_recall("the cat sat on the mat", "the cat on mat") == pytest.approx(4 / 6)
    assert tofu.rouge_l_recall("Wenbrawick.", "Wenbrawick. It was") == pytest.approx(1.0)
    assert tofu.rouge_l_recall("fantasy", "poetry") == 0.0


def test_forget_quality_is_the_ks_p_value():
    a = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert tofu.forget_quality(a, list(a)) == pytest.approx(1.0)
    # disjoint samples of 5 and 5: D = 1, exact two-sided p = 2 / C(10, 5)
    assert tofu.forget_quality(a, [x + 1 for x in a]) == pytest.approx(2 / comb(10, 5))
    # R vs 1/R does not change the p-value when applied to both (monotone transform)
    b = [0.15, 0.6, 0.9, 1.3, 0.05, 0.7]
    assert tofu.forget_quality(a, b) == pytest.approx(tofu.forget_quality([1 / x for x in a], [1 / x for x in b]))


def test_model_utility_is_the_harmonic_mean():
    assert tofu.model_utility([0.5, 1.0]) == pytest.approx(2 / 3)
    assert tofu.model_utility([0.2, 0.4, 0.8]) == pytest.approx(3 / (5 + 2.5 + 1.25))
    assert tofu.model_utility([0.9, 0.0, 0.7]) == 0.0


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = build_model_dir(tmp_path_factory.mktemp("m"))
    return AutoModelForCausalLM.from_pretrained(d).double().eval(), AutoTokenizer.from_pretrained(d)


@torch.no_grad()
def _hf_mean_nll(model, tok, q: str, a: str) -> float:
    """One unpadded row, question (with the tokenizer's own special tokens) and answer encoded apart,
    token by token in float64."""
    q_ids = tok(q)["input_ids"]
    a_ids = tok.encode(a, add_special_tokens=False)
    logp = torch.log_softmax(model(input_ids=torch.tensor([q_ids + a_ids])).logits[0].double(), dim=-1)
    return -sum(float(logp[len(q_ids) - 1 + i, t]) for i, t in enumerate(a_ids)) / len(a_ids)


ROWS = [
    {"question": "the cat sat", "answer": " on a mat", "paraphrased_answer": " on the mat",
     "perturbed_answer": [" under a tree", " to the sea fish"]},
    {"question": "dog ran to the hill under", "answer": " sun", "paraphrased_answer": " the sun",
     "perturbed_answer": [" moon", " star sky"]},
    {"question": "bird", "answer": " sky sea fish bird tree", "paraphrased_answer": " sky and sea",
     "perturbed_answer": [" leaf", " cat dog"]},
]


def test_answer_nll_matches_the_hf_loss_on_ragged_rows(model_and_tok):
    model, tok = model_and_tok
    q, a = [r["question"] for r in ROWS], [r["answer"] for r in ROWS]
    got = tofu.answer_nlls(model, tok, q, a, batch_size=2)  # a ragged last batch, padded rows
    want = [_hf_mean_nll(model, tok, x, y) for x, y in zip(q, a)]
    assert got == pytest.approx(want, rel=1e-9)


def test_score_items_truth_ratio_from_hf_losses(model_and_tok):
    model, tok = model_and_tok
    gen = HFGenerator.for_tokenizer(model, tok, batch_size=2)
    items = tofu.score_items(model, tok, gen, ROWS, tofu.TofuSettings(batch_size=2, max_new_tokens=4))
    for r, it in zip(ROWS, items):
        para = _hf_mean_nll(model, tok, r["question"], r["paraphrased_answer"])
        pert = [_hf_mean_nll(model, tok, r["question"], p) for p in r["perturbed_answer"]]
        want = math.exp(-sum(pert) / len(pert)) / math.exp(-para)
        assert it["truth_ratio"] == pytest.approx(want, rel=1e-9)
        assert it["probability"] == pytest.approx(math.exp(-_hf_mean_nll(model, tok, r["question"], r["answer"])))
        assert 0.0 <= it["rougeL_recall"] <= 1.0 and it["exact"] in (0.0, 1.0)
    report = tofu.evaluate_tofu(model, tok, gen, ROWS[:2], ROWS[1:], tofu.TofuSettings(batch_size=2),
                                task_accuracy=0.5, reference_ratios=[it["truth_ratio"] for it in items[:2]])
    assert report["forget_quality"] == pytest.approx(1.0)  # the same model as its own reference
    r = report["retain"]
    assert report["model_utility"] == pytest.approx(tofu.model_utility(
        [r["probability"], r["rougeL_recall"], r["truth_ratio"], 0.5]))


def test_malformed_tofu_records_name_file_line_and_key(tmp_path):
    from fisherdist.data.jsonl import write_jsonl
    from fisherdist.errors import FisherdistError

    good = dict(ROWS[0])
    path = write_jsonl(tmp_path / "f.jsonl", [good, {**good, "perturbed_answer": " one string"}])
    with pytest.raises(FisherdistError, match=r"f.jsonl:2: field 'perturbed_answer'"):
        tofu.tofu_records(path)
    assert tofu.tofu_records(write_jsonl(tmp_path / "g.jsonl", [good, good])) == [good, good]
