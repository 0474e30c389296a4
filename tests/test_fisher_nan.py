"""NaN/inf samples are skipped, counted and warned about; too many of them is an error."""

from __future__ import annotations

import pytest
import torch

from fisherdist.errors import FisherdistError
from fisherdist.fisher import FisherSpec, estimate_fisher
from tests.fisher_oracle import dataset, oracle, tiny_llama
from tests.test_fisher_engine import FULL, assert_rel_close

MARK = 63  # a first token reserved for broken samples


def marked_dataset(bad: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = dataset(12)
    ids[:, 0] = ids[:, 0] % MARK
    ids[sorted(bad), 0] = MARK
    return ids, ids.masked_fill(labels == -100, -100)


class Poison(torch.nn.Module):
    """Wraps the model: samples starting with MARK get inf activations, as a broken sample would."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        emb = self.model.model.embed_tokens(input_ids)
        broken = (input_ids[:, :1] == MARK)[..., None]
        emb = torch.where(broken, torch.full_like(emb, float("inf")), emb)
        return self.model(inputs_embeds=emb, attention_mask=attention_mask)


def run(bad: set[int], max_bad: float):
    ids, labels = marked_dataset(bad)
    batches = [{"input_ids": ids[lo : lo + 3], "labels": labels[lo : lo + 3]} for lo in range(0, 12, 3)]
    spec = FisherSpec(granularity="microbatch", params=[f"model.{p}" for p in FULL], dtype="float64", max_bad_fraction=max_bad)
    return estimate_fisher(Poison(tiny_llama()), batches, spec, progress=False)


def test_bad_samples_are_skipped_counted_and_warned():
    with pytest.warns(UserWarning, match="skipped 1 of 12"):
        acc = run({4}, max_bad=0.1)
    counts = acc.state.global_counts()
    assert counts["skipped"] == 1 and counts["samples"] == 11
    # the oracle on the same micro-batches without sample 4
    model = tiny_llama()
    ids, labels = marked_dataset({4})
    names = [f"model.{n}" for n, _ in model.named_parameters()]
    units = [[0, 1, 2], [3, 5], [6, 7, 8], [9, 10, 11]]
    ref = {}
    for u in units:
        r = oracle(model, ids[u], labels[u], [n[len("model."):] for n in names], "microbatch", "empirical", 1, len(u))
        for n in names:
            ref[n] = ref.get(n, 0) + r[n[len("model."):]] / len(units)
    for n in names:
        assert_rel_close(acc.full_fisher(n), ref[n], n)


def test_too_many_bad_samples_fail():
    with pytest.raises(FisherdistError, match="max_bad_fraction"), pytest.warns(UserWarning):
        run({0, 4, 9}, max_bad=0.1)
