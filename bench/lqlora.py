"""LQ-LoRA vs QLoRA's NF4 at matched bits on the tiny world, decomposition time at 4096 x 4096, and NF4's
relative error on Gaussian matrices, in ONE run.

    python bench/lqlora.py --out bench/results/lqlora.json

1. A diagonal empirical Fisher (per sample, mean convention) of the tiny world's 28 ``*_proj`` weights from
   the engine (``fisherdist.fisher.estimate_fisher``, one process) on general_train text.
2. Cost tables (one LQ decomposition per matrix and configuration of the small grid, rank 8): Fisher-
   weighted (elementwise F in the cost and the stopping test, row x column scales in the SVD) and
   data-agnostic (plain Frobenius), then the ILP at each budget.
3. Compared at init (no fine-tuning; QLoRA's adapters start at zero, LQ-LoRA's at L1 L2): the Fisher-weighted
   error sum ||sqrt(F) . (W - W_hat)||^2 relative to sum ||sqrt(F) . W||^2, and held-out perplexity with
   the W_hat substituted. Baseline: bitsandbytes NF4, block 64, its double-quantized scales (4.127 bits).
   Each perplexity comes with the paired bootstrap 95% interval (texts resampled) of its difference to NF4's,
   and, as a diagnostic (nothing is chosen with it), the held-out NLL change predicted to second order:
   ``taylor_linear`` = g . (W_hat - W) with g the held-out NLL gradient, ``taylor_quadratic`` =
   0.5 sum F_heldout (W_hat - W)^2 (the term a Fisher-weighted error controls), next to the measured
   ``delta_heldout_nll``; and the correlation of the calibration Fisher with the held-out one.
   Then LoRA fine-tuning at equal rank (``--steps`` steps of 8 x 128 tokens of general_train, the shared
   trainer): QLoRA = NF4 weights frozen + PEFT's adapter (B = 0); LQ-LoRA = the recipe's packed-Q layers +
   adapter from L1, L2 (at ``--finetune-budgets``); held-out perplexity after it.
4. Seconds per alternation and per decomposition of one 4096 x 4096 Gaussian matrix (rank 64, nf3, randomized
   SVD), and the relative Frobenius error of NF4 on it (bitsandbytes and ours).
Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fisherdist.methods.lqlora.allocate import parse_costs, solve
from fisherdist.methods.lqlora.decompose import LQResult, lq_decompose
from fisherdist.methods.lqlora.fisher_weights import FisherWeights
from fisherdist.methods.lqlora.grid import small_grid
from fisherdist.models.quant import QConfig, quantize

WORLD = Path(__file__).resolve().parents[1] / "fisherdist" / "world" / "default"
BUDGETS = [4.127, 3.5, 3.127, 2.75]


def tiny_fisher(model: Any, tokenizer: Any, n: int | None, max_length: int,
                source: str = "general_train") -> dict[str, torch.Tensor]:
    """Dense per-sample empirical Fisher of every ``*_proj`` weight, from the engine on one process."""
    from fisherdist.data.batches import load_texts, rank_batches, tokenize
    from fisherdist.fisher import FisherSpec, estimate_fisher

    texts = load_texts(WORLD / "data" / f"{source}.jsonl", "text", n)
    batches = rank_batches(tokenize(texts, tokenizer, max_length), 8, 0, 1, tokenizer.pad_token_id or 0)
    spec = FisherSpec(estimator="empirical", granularity="sample", params=["model.layers.*_proj.weight"])
    acc = estimate_fisher(model, batches, spec, progress=False)
    return {fqn: acc.full_fisher(fqn).clone() for fqn in acc.targets}


def heldout_gradient(model: Any, tokenizer: Any, heldout: list[str], names: list[str]) -> dict[str, torch.Tensor]:
    """Gradient of the held-out token-mean NLL (the perplexity's log) w.r.t. the quantized weights: the
    first-order term g . (W_hat - W) of the perplexity change, which no weighted error can see."""
    from fisherdist.data.batches import tokenize
    from fisherdist.recipes.losses import collate_prompted, label_tokens, sft_loss

    rows = [t for t in tokenize(heldout, tokenizer, 128) if len(t) >= 2]
    b = collate_prompted([[] for _ in rows], rows, tokenizer.pad_token_id or 0, 128)
    params = dict(model.named_parameters())
    model.zero_grad()
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    (sft_loss(logits, b.labels).sum() / label_tokens(b.labels).sum()).backward()
    grad = {n: params[n].grad.detach().clone() for n in names}
    model.zero_grad()
    return grad


def taylor(weights: dict[str, torch.Tensor], approx: dict[str, torch.Tensor], grad: dict[str, torch.Tensor],
           fisher_heldout: dict[str, torch.Tensor]) -> dict[str, float]:
    """Held-out NLL change predicted to second order: g . delta and 0.5 delta' F_heldout delta."""
    d = {n: approx[n] - weights[n] for n in weights}
    return {"taylor_linear": sum(float((grad[n] * d[n]).sum()) for n in d),
            "taylor_quadratic": 0.5 * sum(float((fisher_heldout[n] * d[n] ** 2).sum()) for n in d)}


def decompose_all(weights: dict[str, torch.Tensor], fishers: dict[str, FisherWeights] | None, rank: int,
                  iters: int, configs: list[QConfig]) -> dict[str, dict[str, LQResult]]:
    """One decomposition per matrix and grid configuration (the cost table's work)."""
    return {n: {c.name: lq_decompose(w, c, rank, iters, fishers[n] if fishers else None, seed=i)
                for c in configs} for i, (n, w) in enumerate(weights.items())}


def plan(results: dict[str, dict[str, LQResult]], weights: dict[str, torch.Tensor], budget: float) -> dict[str, str]:
    costs = {"matrices": [{"name": n, "numel": weights[n].numel(), "configs": [
        {"name": c, "bits_per_param": QConfig.parse(c).bits_per_param(), "error": r.error} for c, r in per.items()]}
        for n, per in results.items()]}
    return solve(parse_costs(costs, "bench"), budget)[0]["assignment"]


def nf4_bnb(w: torch.Tensor) -> torch.Tensor:
    """QLoRA's NF4: bitsandbytes, block 64, nested (double-quantized) absmax."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return bnbf.dequantize_4bit(packed, state)


def text_nlls(model: Any, tokenizer: Any, heldout: list[str]) -> torch.Tensor:
    """[texts, 2]: summed NLL and scored tokens of each held-out text (their ratio of sums is the perplexity's)."""
    from fisherdist.eval.utility import perplexity

    rows = [perplexity(model, tokenizer, [t]) for t in heldout]
    return torch.tensor([[r["nll"] * r["tokens"], r["tokens"]] for r in rows], dtype=torch.float64)


def paired_ci(a: torch.Tensor, b: torch.Tensor, draws: int = 4000) -> list[float]:
    """95% bootstrap interval (resampling texts, paired) of perplexity(a) - perplexity(b), both [texts, 2]."""
    idx = torch.randint(0, len(a), (draws, len(a)), generator=torch.Generator().manual_seed(0))
    ppl = lambda x: (x[idx, 0].sum(1) / x[idx, 1].sum(1)).exp()  # noqa: E731
    diff = ppl(a) - ppl(b)
    return [float(diff.quantile(0.025)), float(diff.quantile(0.975))]


def evaluate(model: Any, tokenizer: Any, weights: dict[str, torch.Tensor], approx: dict[str, torch.Tensor],
             fisher: dict[str, torch.Tensor], heldout: list[str]) -> tuple[dict[str, float], torch.Tensor]:
    """Relative Fisher-weighted error and held-out perplexity with ``approx`` substituted (+ per-text NLLs)."""
    num = sum(float((fisher[n] * (weights[n] - approx[n]) ** 2).sum()) for n in weights)
    den = sum(float((fisher[n] * weights[n] ** 2).sum()) for n in weights)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in weights:
            params[n].copy_(approx[n])
        per_text = text_nlls(model, tokenizer, heldout)
        for n in weights:
            params[n].copy_(weights[n])
    ppl = float((per_text[:, 0].sum() / per_text[:, 1].sum()).exp())
    return {"fisher_weighted_rel_error": num / den, "heldout_perplexity": ppl}, per_text


def lq_rows(results: dict[str, dict[str, LQResult]], weights: dict[str, torch.Tensor], rank: int,
            label: str) -> list[tuple[str, float, float, dict[str, torch.Tensor], dict[str, LQResult]]]:
    """(label, quantized bits, bits with the 16-bit L1 L2, W_hat, chosen decompositions) at every budget."""
    total = sum(w.numel() for w in weights.values())
    lowrank_bits = 16 * sum(rank * sum(w.shape) for w in weights.values()) / total
    rows = []
    least = min(QConfig.parse(c).bits_per_param() for c in next(iter(results.values())))
    for budget in (b for b in BUDGETS if b >= least):  # a grid without 2-bit configurations cannot reach 2.75
        assignment = plan(results, weights, budget)
        bits = sum(weights[n].numel() * QConfig.parse(c).bits_per_param() for n, c in assignment.items()) / total
        approx = {n: (r := results[n][c]).q.dequantize() + r.l1 @ r.l2 for n, c in assignment.items()}
        rows.append((f"{label} @ {budget}", bits, bits + lowrank_bits, approx, {n: results[n][c] for n, c in assignment.items()}))
    return rows


def finetune_perplexity(tokenizer: Any, weights: dict[str, torch.Tensor], dense: dict[str, torch.Tensor],
                        chosen: dict[str, LQResult] | None, texts: list[list[int]], heldout: list[str],
                        args: argparse.Namespace) -> torch.Tensor:
    """Held-out perplexity after ``args.steps`` LoRA steps (rank ``args.rank``, all 7 projections) on the shared
    trainer. LQ-LoRA: packed-Q layers, adapter = L1, L2 (the recipe's own code). QLoRA: the dequantized NF4
    weights frozen (bitsandbytes' forward computes exactly these), adapter from PEFT's init (B = 0)."""
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.methods.lqlora.train_stage import lqlora_factors, quantized_lora
    from fisherdist.methods.sft import SftTrain, run_sft
    from fisherdist.models.load import load_model
    from fisherdist.models.peft_utils import LoraSettings, apply_lora

    base = load_model(WORLD / "model")
    lora = LoraSettings(r=args.rank, alpha=16.0, dropout=0.0,
                        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.no_grad():
        params = dict(base.named_parameters())
        for n in weights:
            params[n].copy_(dense[n])
    if chosen is None:
        torch.manual_seed(0)
        model = apply_lora(base, lora)
    else:
        model = quantized_lora(base, lora, {n: r.q for n, r in chosen.items()})
        lqlora_factors(model, {n: (r.l1, r.l2) for n, r in chosen.items()})
    w = wrap_model(model, "none", optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=args.lr, weight_decay=0.0))
    settings = SftTrain(lr=args.lr, epochs=1, max_steps=args.steps, batch_size=8, max_length=128, checkpoint_every=None)
    run_sft(w, [([], seq) for seq in texts], settings, tokenizer.pad_token_id or 0, progress=False)
    model.eval()
    return text_nlls(model, tokenizer, heldout)


def tiny_world(args: argparse.Namespace) -> list[dict[str, Any]]:
    from fisherdist.data.batches import load_texts, tokenize
    from fisherdist.models.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(WORLD / "model")
    t0 = time.perf_counter()
    fisher = tiny_fisher(model, tokenizer, args.calibration, 128)
    print(f"fisher: {len(fisher)} matrices in {time.perf_counter() - t0:.1f}s", flush=True)
    params = dict(model.named_parameters())
    weights = {n: params[n].detach().clone() for n in fisher}
    heldout = load_texts(WORLD / "data" / "general_heldout.jsonl", "text")
    # diagnostics only (nothing below is chosen with them): the held-out Fisher and gradient
    fisher_heldout = tiny_fisher(model, tokenizer, None, 128, "general_heldout")
    grad = heldout_gradient(model, tokenizer, heldout, list(fisher))
    flat = [torch.cat([f[n].flatten() for n in fisher]) for f in (fisher, fisher_heldout)]
    agreement = {"corr_fisher_calibration_vs_heldout": float(torch.corrcoef(torch.stack(flat))[0, 1]),
                 "corr_log_fisher": float(torch.corrcoef(torch.stack([f.clamp_min(1e-30).log() for f in flat]))[0, 1])}
    print(json.dumps(agreement), flush=True)
    train = tokenize(load_texts(WORLD / "data" / "general_train.jsonl", "text"), tokenizer, 128)
    configs = [QConfig.parse(c) for c in args.grid] if args.grid else small_grid()
    t0 = time.perf_counter()
    weighted = decompose_all(weights, {n: FisherWeights.from_full(f) for n, f in fisher.items()}, args.rank, args.iters,
                             configs)
    agnostic = decompose_all(weights, None, args.rank, args.iters, configs)
    print(f"cost tables: {time.perf_counter() - t0:.1f}s", flush=True)
    nf4 = {n: nf4_bnb(w) for n, w in weights.items()}
    rows = [("NF4 (bitsandbytes, QLoRA)", 4.127, 4.127, nf4, None)]
    rows += lq_rows(weighted, weights, args.rank, "LQ-LoRA Fisher") + lq_rows(agnostic, weights, args.rank, "LQ-LoRA")
    base = evaluate(model, tokenizer, weights, weights, fisher, heldout)[0]["heldout_perplexity"]
    out = [{"method": "16-bit model", "bits_per_param": 16.0, "bits_with_lowrank": 16.0,
            "fisher_weighted_rel_error": 0.0, "heldout_perplexity": base, **agreement}]
    ref: dict[str, torch.Tensor] = {}  # NF4's per-text NLLs, at init and fine-tuned: the paired intervals' reference
    for label, bits, with_lr, approx, chosen in rows:
        metrics, per_text = evaluate(model, tokenizer, weights, approx, fisher, heldout)
        ref.setdefault("init", per_text)
        out.append({"method": label, "bits_per_param": bits, "bits_with_lowrank": with_lr, **metrics,
                    "heldout_ppl_minus_nf4_ci95": paired_ci(per_text, ref["init"]),
                    "delta_heldout_nll": math.log(metrics["heldout_perplexity"] / base),
                    **taylor(weights, approx, grad, fisher_heldout)})
        if args.steps and (chosen is None or float(label.split("@")[1]) in args.finetune_budgets):
            q_only = approx if chosen is None else {n: r.q.dequantize() for n, r in chosen.items()}
            tuned = finetune_perplexity(tokenizer, weights, q_only, chosen, train, heldout, args)
            ref.setdefault("tuned", tuned)
            out[-1]["heldout_perplexity_finetuned"] = float((tuned[:, 0].sum() / tuned[:, 1].sum()).exp())
            out[-1]["finetuned_minus_nf4_ci95"] = paired_ci(tuned, ref["tuned"])
        print(json.dumps(out[-1]), flush=True)
    return out


def big_matrix(args: argparse.Namespace) -> dict[str, Any]:
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    rel = lambda a: float((w - a).norm() / w.norm())  # noqa: E731
    t0 = time.perf_counter()
    res = lq_decompose(w, QConfig.parse("nf3"), 64, args.big_iters)
    seconds = time.perf_counter() - t0
    return {"shape": [4096, 4096], "rank": 64, "config": "nf3", "iterations": len(res.errors),
            "seconds": seconds, "seconds_per_iteration": seconds / len(res.errors),
            "rel_frobenius_lq_nf3": res.error ** 0.5 / float(w.norm()),
            "rel_frobenius_nf4_bnb": rel(nf4_bnb(w)), "rel_frobenius_nf4_ours": rel(quantize(w, QConfig.parse("nf4")).dequantize())}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("fisher_weighted_rel_error", "heldout_perplexity")):
        for label, marker in (("LQ-LoRA Fisher", "o-"), ("LQ-LoRA", "s--")):
            pts = [(r["bits_per_param"], r[key]) for r in rows if r["method"].startswith(label + " @")]
            ax.plot(*zip(*pts), marker, label=label)
        nf4 = next(r for r in rows if r["method"].startswith("NF4"))
        ax.plot([nf4["bits_per_param"]], [nf4[key]], "r*", markersize=14, label="NF4 (QLoRA)")
        if key == "heldout_perplexity":
            ax.axhline(rows[0][key], color="gray", lw=0.8, label="16-bit")
        ax.set_xlabel("bits per parameter (quantized part)")
        ax.set_title(key.replace("_", " "))
        ax.legend()
    fig.suptitle("Tiny world, rank 8, at initialisation (no fine-tuning)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/lqlora.json")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--iters", type=int, default=20, help="max alternations per cost-table decomposition")
    p.add_argument("--calibration", type=int, default=64, help="general_train sequences for the Fisher")
    p.add_argument("--big-iters", type=int, default=5, help="alternations on the 4096 x 4096 matrix (0: skip)")
    p.add_argument("--no-tiny", action="store_true", help="only the 4096 x 4096 part (no PNG)")
    p.add_argument("--grid", nargs="*", help="configuration names (default: the small grid of 8)")
    p.add_argument("--steps", type=int, default=30, help="LoRA fine-tuning steps (batch 8 x 128 tokens; 0: skip)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--finetune-budgets", type=float, nargs="*", default=[4.127, 3.5], help="LQ-LoRA budgets fine-tuned")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"machine": "2-core CPU", "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    if not args.no_tiny:
        result["tiny_world"] = tiny_world(args)
    if args.big_iters:
        result["matrix_4096"] = big_matrix(args)
        print(json.dumps(result["matrix_4096"]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_tiny:
        plot(result["tiny_world"], out.with_suffix(".png"))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
