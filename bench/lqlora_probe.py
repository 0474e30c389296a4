"""Where the held-out perplexity change of NF4 vs LQ-LoRA (nf4 for every matrix, rank 8, 10 alternations) comes
from, at initialisation: every held-out token scored (128-token windows, 9,338 tokens instead of the first 128
of each text), and the measured NLL change of W + delta split into its odd (first-order, g . delta) and even
(second-order and up) parts by also scoring W - delta:  lin = (f(W+d) - f(W-d)) / 2,
quad = (f(W+d) + f(W-d)) / 2 - f(W). A weighted error can only control ``quad``.

    python bench/lqlora_probe.py        # ~7 min on the shared 2-core CPU at load 3-10; prints the rows of bench/results/lqlora_probe.log
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lqlora import WORLD, nf4_bnb, paired_ci, tiny_fisher
from bench.lqlora_windows import first_windows, per_text_nll, perplexity, substituted, windows
from fisherdist.data.batches import load_texts
from fisherdist.methods.lqlora.decompose import lq_decompose
from fisherdist.methods.lqlora.fisher_weights import FisherWeights
from fisherdist.models.load import load_model_and_tokenizer
from fisherdist.models.quant import QConfig


def lq_approximations(weights: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Q + L1 L2 of every matrix, Fisher-weighted (``lqF``) and data-agnostic (``lqA``)."""
    out: dict[str, dict] = {"lqF": {}, "lqA": {}}
    for i, (n, w) in enumerate(weights.items()):
        for label, weighting in (("lqF", FisherWeights.from_full(fisher[n])), ("lqA", None)):
            r = lq_decompose(w, QConfig.parse("nf4"), 8, 10, weighting, seed=i)
            out[label][n] = r.q.dequantize() + r.l1 @ r.l2
    return out


def probe(model, weights, fisher, approx, rows, n_texts, base) -> dict[str, torch.Tensor]:
    """Prints the Fisher-weighted error and the odd / even split of the NLL change; per-text NLLs back."""
    delta = {n: approx[n] - weights[n] for n in weights}
    with substituted(model, approx):
        plus = per_text_nll(model, rows, n_texts)
        trunc = per_text_nll(model, first_windows(rows), n_texts)
    with substituted(model, {n: weights[n] - delta[n] for n in weights}):
        minus = per_text_nll(model, rows, n_texts)
    ferr = (sum(float((fisher[n] * delta[n] ** 2).sum()) for n in weights)
            / sum(float((fisher[n] * weights[n] ** 2).sum()) for n in weights))
    nll = [float(x[:, 0].sum() / x[:, 1].sum()) for x in (base, plus, minus)]
    up, down = nll[1] - nll[0], nll[2] - nll[0]
    print(f"ferr {ferr:.5f} ppl_all {perplexity(plus):.3f} ppl_trunc {perplexity(trunc):.3f} dNLL {up:+.5f} "
          f"lin {(up - down) / 2:+.5f} quad {(up + down) / 2:+.5f}", flush=True)
    return {"plus": plus, "trunc": trunc}


def main() -> None:
    torch.set_num_threads(2)
    model, tok = load_model_and_tokenizer(WORLD / "model")
    model.eval()
    held = load_texts(WORLD / "data" / "general_heldout.jsonl", "text")
    rows = windows(tok, held)
    print("windows", len(rows), "scored tokens", sum(len(x) - 1 for _, x in rows))
    t0 = time.time()
    fisher = tiny_fisher(model, tok, 64, 128)
    print("fisher", time.time() - t0, flush=True)
    params = dict(model.named_parameters())
    weights = {n: params[n].detach().clone() for n in fisher}
    base = per_text_nll(model, rows, len(held))
    print("base ppl all tokens", perplexity(base), "trunc", perplexity(per_text_nll(model, first_windows(rows), len(held))))
    t0 = time.time()
    approximations = {"nf4": {n: nf4_bnb(w) for n, w in weights.items()}, **lq_approximations(weights, fisher)}
    print("decomp", time.time() - t0, flush=True)
    res = {}
    for label, approx in approximations.items():
        print(label, end=" ")
        res[label] = probe(model, weights, fisher, approx, rows, len(held), base)
    for label in ("lqF", "lqA"):
        print(label, "-nf4 CI all", paired_ci(res[label]["plus"], res["nf4"]["plus"]),
              "trunc", paired_ci(res[label]["trunc"], res["nf4"]["trunc"]))


if __name__ == "__main__":
    main()
