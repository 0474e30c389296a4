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

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lqlora import WORLD, nf4_bnb, paired_ci, tiny_fisher
from bench.lqlora_windows import per_text_nll, perplexity, substituted, windows
from fisherdist.data.batches import load_texts, rank_batches
from fisherdist.fisher import FisherSpec, estimate_fisher
from fisherdist.methods.lqlora.decompose import LQResult, lq_decompose
from fisherdist.methods.lqlora.fisher_weights import FisherWeights
from fisherdist.models.load import load_model, load_model_and_tokenizer
from fisherdist.models.peft_utils import LoraSettings
from fisherdist.models.quant import QConfig

LORA = LoraSettings(r=8, alpha=16.0, dropout=0.0,
                    targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
ARMS = ["nf4_init", "lq_init", "nf4_ft", "lq_ft", "base", "control_16bit_ft"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--calib", default="half", help="half: the other half of general_heldout; train: 64 general_train texts")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--folds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--seed", type=int, default=0, help="adapter init, data order, randomized SVD")
    p.add_argument("--agnostic", action="store_true", help="data-agnostic LQ-LoRA (plain Frobenius error)")
    p.add_argument("--merge", nargs="*", help="per-fold JSON files to pool (no computation)")
    p.add_argument("--out", default="bench/results/lqlora_crossfit.json")
    return p.parse_args()


def fisher_of(model: Any, tok: Any, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """The engine's per-sample empirical Fisher of every projection on the calibration windows."""
    batches = rank_batches(seqs, 8, 0, 1, tok.pad_token_id or 0)
    spec = FisherSpec(estimator="empirical", granularity="sample", params=["model.layers.*_proj.weight"])
    acc = estimate_fisher(model, batches, spec, progress=False)
    return {f: acc.full_fisher(f).clone() for f in acc.targets}


def finetune(args: argparse.Namespace, tok: Any, dense: dict[str, torch.Tensor], start: Any,
             seqs: list[list[int]]) -> Any:
    """LoRA fine-tuning through the SFT recipe's run_sft. ``start``: None (QLoRA: frozen ``dense``, B = 0),
    {name: (L1, L2)} (the 16-bit control) or {name: LQResult} (LQ-LoRA: packed Q + adapter from L1, L2)."""
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.methods.lqlora.train_stage import lqlora_factors, quantized_lora
    from fisherdist.methods.sft import SftTrain, run_sft
    from fisherdist.models.peft_utils import apply_lora

    base = load_model(WORLD / "model")
    with torch.no_grad():
        params = dict(base.named_parameters())
        for n, w in dense.items():
            params[n].copy_(w)
    torch.manual_seed(args.seed)
    if start is None or isinstance(next(iter(start.values())), tuple):
        model = apply_lora(base, LORA)
        if start is not None:
            lqlora_factors(model, start)
    else:
        model = quantized_lora(base, LORA, {n: r.q for n, r in start.items()})
        lqlora_factors(model, {n: (r.l1, r.l2) for n, r in start.items()})
    wrapped = wrap_model(model, "none", optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=args.lr, weight_decay=0.0))
    settings = SftTrain(lr=args.lr, epochs=100, max_steps=args.steps, batch_size=8, max_length=128,
                        checkpoint_every=None, seed=args.seed)
    run_sft(wrapped, [([], seq) for seq in seqs], settings, tok.pad_token_id or 0, progress=False)
    model.eval()
    return model


def svd_control(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """L1, L2 = the rank-8 SVD of W, split sqrt(S) each side (the control's adapter start)."""
    out = {}
    for n, w in weights.items():
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        out[n] = (u[:, :8] * s[:8].sqrt(), s[:8].sqrt()[:, None] * vt[:8])
    return out


def run_fold(args: argparse.Namespace, model: Any, tok: Any, halves: list[list[str]], fold: int,
             weights: dict[str, torch.Tensor], nf4: dict[str, torch.Tensor], res: dict[str, list]) -> None:
    """Calibrate and fine-tune on one half, score every token of the other; appends to ``res``."""
    calib, held = halves[1 - fold], halves[fold]
    rows = windows(tok, held)
    seqs = [x for _, x in windows(tok, calib)]
    t0 = time.time()
    fisher = fisher_of(model, tok, seqs) if args.calib == "half" else tiny_fisher(model, tok, 64, 128)
    chosen: dict[str, LQResult] = {
        n: lq_decompose(w, QConfig.parse("nf4"), 8, args.iters,
                        None if args.agnostic else FisherWeights.from_full(fisher[n]), seed=i + 1000 * args.seed)
        for i, (n, w) in enumerate(weights.items())}
    print("fold", fold, "fisher+decomp", time.time() - t0, flush=True)
    res["base"].append(per_text_nll(model, rows, len(held)))
    lq = {n: r.q.dequantize() + r.l1 @ r.l2 for n, r in chosen.items()}
    for label, approx in (("nf4_init", nf4), ("lq_init", lq)):
        with substituted(model, approx):
            res[label].append(per_text_nll(model, rows, len(held)))
    if args.steps:
        t0 = time.time()
        res["nf4_ft"].append(per_text_nll(finetune(args, tok, nf4, None, seqs), rows, len(held)))
        quantized = {n: r.q.dequantize() for n, r in chosen.items()}
        res["lq_ft"].append(per_text_nll(finetune(args, tok, quantized, chosen, seqs), rows, len(held)))
        control = svd_control(weights)
        frozen = {n: weights[n] - a @ b for n, (a, b) in control.items()}
        res["control_16bit_ft"].append(per_text_nll(finetune(args, tok, frozen, control, seqs), rows, len(held)))
        print("ft", time.time() - t0, flush=True)
    print({label: perplexity(v[-1]) for label, v in res.items() if v}, flush=True)


def report(args: argparse.Namespace, pooled: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Perplexities, per-text NLLs and the paired bootstrap intervals of the pooled folds."""
    print({label: round(perplexity(v), 3) for label, v in pooled.items()})
    out = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU",
           "perplexity": {label: perplexity(v) for label, v in pooled.items()},
           "per_text": {label: v.tolist() for label, v in pooled.items()},
           "init_lq_minus_nf4_ci95": paired_ci(pooled["lq_init"], pooled["nf4_init"])}
    print("init lq-nf4", out["init_lq_minus_nf4_ci95"])
    if "lq_ft" in pooled:
        out["finetuned_lq_minus_nf4_ci95"] = paired_ci(pooled["lq_ft"], pooled["nf4_ft"])
        out["finetuned_lq_minus_control_ci95"] = paired_ci(pooled["lq_ft"], pooled["control_16bit_ft"])
        print("ft lq-nf4", out["finetuned_lq_minus_nf4_ci95"], "ft lq-control", out["finetuned_lq_minus_control_ci95"])
    return out


def main() -> None:
    args = parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text())["per_text"] for f in args.merge]
        res = {label: [torch.tensor(p[label], dtype=torch.float64) for p in parts] for label in parts[0]}
    else:
        torch.set_num_threads(1 if len(args.folds) == 1 else 2)
        model, tok = load_model_and_tokenizer(WORLD / "model")
        model.eval()
        held = load_texts(WORLD / "data" / "general_heldout.jsonl", "text")
        params = dict(model.named_parameters())
        weights = {n: params[n].detach().clone() for n in params if n.endswith("_proj.weight")}
        nf4 = {n: nf4_bnb(w) for n, w in weights.items()}
        res = {label: [] for label in ARMS}
        for fold in args.folds:
            run_fold(args, model, tok, [held[:20], held[20:]], fold, weights, nf4, res)
    pooled = {label: torch.cat(v) for label, v in res.items() if v}
    Path(args.out).write_text(json.dumps(report(args, pooled), indent=1) + "\n")


if __name__ == "__main__":
    main()
