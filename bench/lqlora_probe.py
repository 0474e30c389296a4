"""Where the held-out perplexity change of NF4 vs LQ-LoRA (nf4 for every matrix, rank 8, 10 alternations) comes
from, at initialisation: every held-out token scored (128-token windows, 9,338 tokens instead of the first 128
of each text), and the measured NLL change of W + delta split into its odd (first-order, g . delta) and even
(second-order and up) parts by also scoring W - delta:  lin = (f(W+d) - f(W-d)) / 2,
quad = (f(W+d) + f(W-d)) / 2 - f(W). A weighted error can only control ``quad``.

    python bench/lqlora_probe.py        # ~7 min on the shared 2-core CPU at load 3-10; prints the rows of bench/results/lqlora_probe.log
"""
import json, math, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.lqlora import WORLD, tiny_fisher, nf4_bnb, paired_ci
from fisherdist.methods.lqlora.decompose import lq_decompose
from fisherdist.methods.lqlora.fisher_weights import FisherWeights
from fisherdist.models.quant import QConfig
from fisherdist.models.load import load_model_and_tokenizer
from fisherdist.data.batches import load_texts
torch.set_num_threads(2)
model, tok = load_model_and_tokenizer(WORLD / "model"); model.eval()
held = load_texts(WORLD / "data" / "general_heldout.jsonl", "text")
bos = tok.bos_token_id
def windows(texts, L=128):
    out = []  # (text index, ids)
    for i, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), L - 1):
            out.append((i, [bos] + ids[s:s + L - 1]))
    return out
W = windows(held)
print("windows", len(W), "scored tokens", sum(len(x) - 1 for _, x in W))
def per_text(texts_n=len(held), trunc=False):
    rows = W if not trunc else [(i, x) for k, (i, x) in enumerate(W) if x[0] == bos and (k == 0 or W[k-1][0] != i)]
    n = max(len(x) for _, x in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long); mask = torch.zeros_like(ids)
    for k, (_, x) in enumerate(rows):
        ids[k, :len(x)] = torch.tensor(x); mask[k, :len(x)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]
    out = torch.zeros(texts_n, 2, dtype=torch.float64)
    for k, (i, _) in enumerate(rows):
        out[i, 0] += float(nll[k].sum()); out[i, 1] += float(mask[k, 1:].sum())
    return out
params = dict(model.named_parameters())
t0 = time.time()
fisher = tiny_fisher(model, tok, 64, 128)
print("fisher", time.time() - t0, flush=True)
names = list(fisher)
weights = {n: params[n].detach().clone() for n in names}
def with_w(approx, fn):
    with torch.no_grad():
        for n in names: params[n].copy_(approx[n])
    r = fn()
    with torch.no_grad():
        for n in names: params[n].copy_(weights[n])
    return r
ppl = lambda x: float((x[:, 0].sum() / x[:, 1].sum()).exp())
base = per_text(); base_tr = per_text(trunc=True)
print("base ppl all tokens", ppl(base), "trunc", ppl(base_tr), flush=True)
nf4 = {n: nf4_bnb(w) for n, w in weights.items()}
t0 = time.time()
lqF = {}; lqA = {}
for i, n in enumerate(names):
    r = lq_decompose(weights[n], QConfig.parse("nf4"), 8, 10, FisherWeights.from_full(fisher[n]), seed=i)
    lqF[n] = r.q.dequantize() + r.l1 @ r.l2
    r = lq_decompose(weights[n], QConfig.parse("nf4"), 8, 10, None, seed=i)
    lqA[n] = r.q.dequantize() + r.l1 @ r.l2
print("decomp", time.time() - t0, flush=True)
res = {}
for lab, ap in [("nf4", nf4), ("lqF", lqF), ("lqA", lqA)]:
    d = {n: ap[n] - weights[n] for n in names}
    plus = with_w(ap, per_text); minus = with_w({n: weights[n] - d[n] for n in names}, per_text)
    trunc = with_w(ap, lambda: per_text(trunc=True))
    ferr = sum(float((fisher[n] * d[n] ** 2).sum()) for n in names) / sum(float((fisher[n] * weights[n] ** 2).sum()) for n in names)
    nb = base[:, 0].sum() / base[:, 1].sum()
    fp = plus[:, 0].sum() / plus[:, 1].sum() - nb; fm = minus[:, 0].sum() / minus[:, 1].sum() - nb
    res[lab] = dict(plus=plus, trunc=trunc)
    print(lab, f"ferr {ferr:.5f} ppl_all {ppl(plus):.3f} ppl_trunc {ppl(trunc):.3f} dNLL {float(fp):+.5f} lin {(float(fp-fm))/2:+.5f} quad {float(fp+fm)/2:+.5f}", flush=True)
for lab in ["lqF", "lqA"]:
    print(lab, "-nf4 CI all", paired_ci(res[lab]["plus"], res["nf4"]["plus"]), "trunc", paired_ci(res[lab]["trunc"], res["nf4"]["trunc"]))
