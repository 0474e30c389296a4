"""The shared losses against float64 formulas written out here token by token (Python floats, no torch
softmax), on ragged rows with masked prompts; the two reference modes against an explicit second model."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from fisherdist.recipes.losses import (
    IGNORE,
    FrozenAdapter,
    collate_pairs,
    collate_prompted,
    dpo_loss,
    gradient_difference,
    ihl_loss,
    label_tokens,
    npo_loss,
    reference_logprobs,
    sequence_logprobs,
    sft_loss,
)
from tests.test_suv_regularizer import tiny_peft

PROMPTS = [[3, 4, 5], [6], [7, 8]]
CONTS = [[9, 1], [2, 3, 4, 5], [6]]


def _probs(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


def _scored(logits: torch.Tensor, labels: torch.Tensor, i: int) -> list[tuple[list[float], int]]:
    """(next-token distribution, true token) at every scored position of row ``i``."""
    lab = labels[i].tolist()
    return [(_probs(logits[i, t].tolist()), lab[t + 1]) for t in range(len(lab) - 1) if lab[t + 1] != IGNORE]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate_prompted(PROMPTS, CONTS, pad_id=0, max_length=5)
    logits = torch.randn(*batch.input_ids.shape, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return logits, batch.labels


def test_collate_masks_prompt_and_truncates_continuation_only() -> None:
    b = collate_prompted(PROMPTS, CONTS, pad_id=0, max_length=5)
    for i, (p, c) in enumerate(zip(PROMPTS, CONTS)):
        keep = c[: 5 - len(p)]
        n = len(p) + len(keep)
        assert b.input_ids[i, :n].tolist() == p + keep and b.input_ids[i, n:].eq(0).all()
        assert b.labels[i, :n].tolist() == [IGNORE] * len(p) + keep and b.labels[i, n:].eq(IGNORE).all()
        assert b.attention_mask[i].tolist() == [1] * n + [0] * (b.input_ids.shape[1] - n)
    pairs = collate_pairs(PROMPTS, CONTS, [[1]] * 3, pad_id=0, max_length=5)
    assert pairs.pairs == 3 and pairs.labels[3:, 3].tolist() == [1, IGNORE, IGNORE]
    assert label_tokens(b.labels).tolist() == [len(c[: 5 - len(p)]) for p, c in zip(PROMPTS, CONTS)]


def test_sequence_and_sft_losses_match_token_sums() -> None:
    logits, labels = _batch()
    want = [sum(math.log(p[y]) for p, y in _scored(logits, labels, i)) for i in range(3)]
    assert sequence_logprobs(logits, labels).tolist() == pytest.approx(want, rel=1e-12)
    assert sft_loss(logits, labels).tolist() == pytest.approx([-w for w in want], rel=1e-12)


def test_ihl_matches_inverted_hinge() -> None:
    logits, labels = _batch()
    want = [sum(max(0.0, 1 + p[y] - max(q for v, q in enumerate(p) if v != y)) for p, y in _scored(logits, labels, i))
            for i in range(3)]
    assert ihl_loss(logits, labels).tolist() == pytest.approx(want, rel=1e-12)


def test_dpo_npo_gd_formulas() -> None:
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(4, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    beta = 0.3
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [-math.log(sig(beta * ((a - c) - (b - d)))) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert dpo_loss(pc, pr, rc, rr, beta).tolist() == pytest.approx(want, rel=1e-9)
    # NPO: NLL = -log p; -(2/beta) log sigma(beta (NLL_theta - NLL_ref))
    want = [-(2 / beta) * math.log(sig(beta * ((-a) - (-c)))) for a, c in zip(pc.tolist(), rc.tolist())]
    assert npo_loss(pc, rc, beta).tolist() == pytest.approx(want, rel=1e-9)
    f64 = torch.float64
    fn, ft, rn, rt = torch.tensor([3.0, 5.0], dtype=f64), torch.tensor([2, 4]), torch.tensor([1.0, 2.0, 6.0], dtype=f64), torch.tensor([1, 1, 3])
    assert float(gradient_difference(fn, ft, rn, rt, 0.5)) == pytest.approx(-8 / 6 + 0.5 * 9 / 5, rel=1e-12)


@pytest.mark.parametrize("mode", ["disabled", "frozen"])
def test_reference_modes(mode: str) -> None:
    model = tiny_peft()
    frozen = FrozenAdapter(model) if mode == "frozen" else None
    start = copy.deepcopy(model)  # the oracle's second copy: the model as it was when the reference was taken
    with torch.no_grad():  # training moves the adapter (and a method like FILA rewrites the base)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    batch = collate_prompted(PROMPTS, CONTS, pad_id=0, max_length=6)
    got = reference_logprobs(model, batch, frozen)
    oracle = start.disable_adapter() if mode == "disabled" else contextlib.nullcontext()
    with oracle, torch.no_grad():
        want = sequence_logprobs(start(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    moved = sequence_logprobs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
    assert not torch.allclose(moved, want, atol=1e-6)  # the swap was undone: the trained adapter is back
    assert all(p.grad is None for p in model.parameters())
