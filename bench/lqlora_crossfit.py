"""LQ-LoRA vs QLoRA's NF4 in the paper's setting on the tiny world: calibration and fine-tuning text from the
evaluation distribution but disjoint from the evaluation text (the paper: C4 train -> C4 validation), which
the world model has not memorised (general_train is memorised: NLL 0.54 vs 4.9 held out).

Cross-fitted over the two contiguous halves of general_heldout (texts 0-19, 20-39): fold k calibrates the
Fisher (per sample, 128-token windows) and fine-tunes on one half and scores every token of the other
(128-token windows), so each of the 40 texts is scored by models that never saw it. LQ-LoRA: nf4 for every
matrix (4.127 bits, = NF4's), rank 8, Fisher-weighted, ``--iters`` alternations; QLoRA: bitsandbytes NF4
(block 64, double-quantized) + PEFT adapter (B = 0). Both: rank 8, alpha 16, all 7 projections, AdamW
``--lr``, ``--steps`` steps of 8 windows, seed 0, the shared trainer. Control (no quantization): the 16-bit
W - L1 L2 frozen with the adapter started at L1, L2 = the rank-8 SVD of W, same training: it separates what
the non-zero adapter start gives from what the quantization gives. Paired bootstrap 95% intervals over the
40 texts of LQ-LoRA's perplexity minus NF4's and minus the control's.

    python bench/lqlora_crossfit.py --steps 20 --lr 1e-4 --out bench/results/lqlora_crossfit.json
    # or one fold per process (one thread each: two threads per process on a loaded 2-core machine were ~10x
    # slower), then pool:
    python bench/lqlora_crossfit.py --folds 0 --out f0.json & python bench/lqlora_crossfit.py --folds 1 --out f1.json
    python bench/lqlora_crossfit.py --merge f0.json f1.json --out bench/results/lqlora_crossfit.json
"""
import json, math, sys, time, argparse
import torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.lqlora import WORLD, nf4_bnb, paired_ci
from fisherdist.methods.lqlora.decompose import lq_decompose
from fisherdist.methods.lqlora.fisher_weights import FisherWeights
from fisherdist.models.quant import QConfig
from fisherdist.models.load import load_model_and_tokenizer, load_model
from fisherdist.data.batches import load_texts, rank_batches
from fisherdist.fisher import FisherSpec, estimate_fisher
p = argparse.ArgumentParser(); p.add_argument("--steps", type=int, default=20); p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--calib", default="half", help="half: the other half of general_heldout; train: 64 general_train texts")
p.add_argument("--iters", type=int, default=10); p.add_argument("--folds", type=int, nargs="*", default=[0, 1])
p.add_argument("--seed", type=int, default=0, help="adapter init, data order, randomized SVD")
p.add_argument("--agnostic", action="store_true", help="data-agnostic LQ-LoRA (plain Frobenius error)")
p.add_argument("--merge", nargs="*", help="per-fold JSON files to pool (no computation)"); p.add_argument("--out", default="bench/results/lqlora_crossfit.json")
args = p.parse_args()
torch.set_num_threads(1 if len(args.folds) == 1 else 2)
model, tok = load_model_and_tokenizer(WORLD / "model"); model.eval()
held = load_texts(WORLD / "data" / "general_heldout.jsonl", "text")
bos = tok.bos_token_id
def windows(texts, L=128):
    out = []
    for i, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), L - 1):
            out.append((i, [bos] + ids[s:s + L - 1]))
    return out
def per_text(m, texts):
    rows = windows(texts); n = max(len(x) for _, x in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long); mask = torch.zeros_like(ids)
    for k, (_, x) in enumerate(rows):
        ids[k, :len(x)] = torch.tensor(x); mask[k, :len(x)] = 1
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]
    out = torch.zeros(len(texts), 2, dtype=torch.float64)
    for k, (i, _) in enumerate(rows):
        out[i, 0] += float(nll[k].sum()); out[i, 1] += float(mask[k, 1:].sum())
    return out
ppl = lambda x: float((x[:, 0].sum() / x[:, 1].sum()).exp())
params = dict(model.named_parameters())
names = [n for n in params if n.endswith("_proj.weight")]
weights = {n: params[n].detach().clone() for n in names}
def fisher_of(seqs):
    batches = rank_batches(seqs, 8, 0, 1, tok.pad_token_id or 0)
    spec = FisherSpec(estimator="empirical", granularity="sample", params=["model.layers.*_proj.weight"])
    acc = estimate_fisher(model, batches, spec, progress=False)
    return {f: acc.full_fisher(f).clone() for f in acc.targets}
def finetune(dense, chosen, seqs):
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.methods.lqlora.train_stage import lqlora_factors, quantized_lora
    from fisherdist.methods.sft import SftTrain, run_sft
    from fisherdist.models.peft_utils import LoraSettings, apply_lora
    base = load_model(WORLD / "model")
    lora = LoraSettings(r=8, alpha=16.0, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.no_grad():
        bp = dict(base.named_parameters())
        for n in names: bp[n].copy_(dense[n])
    torch.manual_seed(args.seed)
    if chosen is None:
        m = apply_lora(base, lora)
    elif isinstance(next(iter(chosen.values())), tuple):  # control: 16-bit W - L1 L2 frozen, adapter = L1, L2
        m = apply_lora(base, lora)
        lqlora_factors(m, chosen)
    else:
        m = quantized_lora(base, lora, {n: r.q for n, r in chosen.items()})
        lqlora_factors(m, {n: (r.l1, r.l2) for n, r in chosen.items()})
    w = wrap_model(m, "none", optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=args.lr, weight_decay=0.0))
    s = SftTrain(lr=args.lr, epochs=100, max_steps=args.steps, batch_size=8, max_length=128, checkpoint_every=None,
                 seed=args.seed)
    run_sft(w, [([], seq) for seq in seqs], s, tok.pad_token_id or 0, progress=False)
    m.eval(); return m
halves = [held[:20], held[20:]]
res = {k: [] for k in ["nf4_init", "lq_init", "nf4_ft", "lq_ft", "base", "control_16bit_ft"]}
nf4 = {n: nf4_bnb(w) for n, w in weights.items()}
for k in (args.folds if not args.merge else []):
    calib, ev = halves[1 - k], halves[k]
    seqs = [x for _, x in windows(calib)]
    t0 = time.time()
    if args.calib == "half":
        F = fisher_of(seqs)
    else:
        from bench.lqlora import tiny_fisher; F = tiny_fisher(model, tok, 64, 128)
    chosen = {n: lq_decompose(weights[n], QConfig.parse("nf4"), 8, args.iters, None if args.agnostic else FisherWeights.from_full(F[n]), seed=i + 1000 * args.seed) for i, n in enumerate(names)}
    print("fold", k, "fisher+decomp", time.time() - t0, flush=True)
    lq = {n: r.q.dequantize() + r.l1 @ r.l2 for n, r in chosen.items()}
    res["base"].append(per_text(model, ev))
    for lab, ap in [("nf4_init", nf4), ("lq_init", lq)]:
        with torch.no_grad():
            for n in names: params[n].copy_(ap[n])
        res[lab].append(per_text(model, ev))
        with torch.no_grad():
            for n in names: params[n].copy_(weights[n])
    if args.steps:
        t0 = time.time()
        res["nf4_ft"].append(per_text(finetune(nf4, None, seqs), ev))
        res["lq_ft"].append(per_text(finetune({n: r.q.dequantize() for n, r in chosen.items()}, chosen, seqs), ev))
        svd = {n: torch.linalg.svd(weights[n], full_matrices=False) for n in names}
        ctl = {n: ((u[:, :8] * s[:8].sqrt()), (s[:8].sqrt()[:, None] * vt[:8])) for n, (u, s, vt) in svd.items()}
        res["control_16bit_ft"].append(per_text(finetune({n: weights[n] - a @ b for n, (a, b) in ctl.items()}, ctl, seqs), ev))
        print("ft", time.time() - t0, flush=True)
    print({l: ppl(v[-1]) for l, v in res.items() if v}, flush=True)
if args.merge:
    parts = [json.loads(Path(f).read_text())["per_text"] for f in args.merge]
    res = {l: [torch.tensor(p[l], dtype=torch.float64) for p in parts] for l in parts[0]}
R = {l: torch.cat(v) for l, v in res.items() if v}
print({l: round(ppl(v), 3) for l, v in R.items()})
print("init lq-nf4", paired_ci(R["lq_init"], R["nf4_init"]))
if "lq_ft" in R: print("ft lq-nf4", paired_ci(R["lq_ft"], R["nf4_ft"]))
out = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU",
       "perplexity": {l: ppl(v) for l, v in R.items()}, "per_text": {l: v.tolist() for l, v in R.items()},
       "init_lq_minus_nf4_ci95": paired_ci(R["lq_init"], R["nf4_init"])}
if "lq_ft" in R:
    out["finetuned_lq_minus_nf4_ci95"] = paired_ci(R["lq_ft"], R["nf4_ft"])
    out["finetuned_lq_minus_control_ci95"] = paired_ci(R["lq_ft"], R["control_16bit_ft"])
    print("ft lq-control", out["finetuned_lq_minus_control_ci95"])
Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
