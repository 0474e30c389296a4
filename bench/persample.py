"""Cost of exact per-example gradient statistics relative to a plain forward+backward (one run).

Workload: a ~5M-parameter Llama (hidden 256, 4 layers, vocab 4096), 16 sequences x 64 tokens, all
parameters targeted, 2 CPU threads. Variants are interleaved round-robin (so background load hits all
alike) and each reports the median of ``--reps`` timings after ``--warmup`` runs (and best-of ratios,
which are less sensitive to other processes competing for memory bandwidth).

    python bench/persample.py --out persample.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from fisherdist.fisher.persample import PerSampleStats, find_targets


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=688, vocab_size=4096, max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg), torch.randint(0, 4096, (16, 64))


def nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token NLL, shape (B,)."""
    lg = logits[:, :-1]
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1).mean(1)


def plain(model, ids) -> Callable[[], None]:
    def run() -> None:
        nll(model(input_ids=ids).logits, ids).sum().backward()
        model.zero_grad(set_to_none=True)

    return run


def ours(model, ids, fused: bool) -> Callable[[], None]:
    ps = PerSampleStats(find_targets(model, [n for n, _ in model.named_parameters()]), fused=fused)
    ps.set_batch(torch.ones(ids.shape[0]))

    def run() -> None:
        ps.attach()
        nll(model(input_ids=ids).logits, ids).sum().backward()
        ps.detach()
        ps.reset()
        model.zero_grad(set_to_none=True)

    return run


def naive(model, ids) -> Callable[[], None]:
    params = [p for p in model.parameters()]

    def run() -> None:
        sq = [torch.zeros_like(p) for p in params]
        for i in range(ids.shape[0]):
            grads = torch.autograd.grad(nll(model(input_ids=ids[i : i + 1]).logits, ids[i : i + 1]).sum(), params)
            for s, g in zip(sq, grads):
                s.addcmul_(g, g)

    return run


def func_vmap(model, ids) -> Callable[[], None]:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, x):
        return nll(functional_call(model, p, (x.unsqueeze(0),)).logits, x.unsqueeze(0)).sum()

    per = vmap(grad(loss_one), in_dims=(None, 0))

    def run() -> None:
        {k: g.square().sum(0) for k, g in per(params, ids).items()}

    return run


def opacus(model, ids) -> Callable[[], None]:
    from opacus import GradSampleModule

    gsm = GradSampleModule(model)

    def run() -> None:
        nll(gsm(input_ids=ids).logits, ids).sum().backward()
        {n: p.grad_sample.square().sum(0) for n, p in gsm.named_parameters()}
        gsm.zero_grad(set_to_none=True)

    return run


def measure(reps: int = 7, warmup: int = 2, threads: int = 2, console: Console | None = None) -> dict:
    """Time every variant round-robin; print a table; return the JSON-ready result."""
    torch.set_num_threads(threads)
    console = console or Console()
    variants = {
        "plain fwd+bwd": plain, "ours (fused Linear)": lambda m, i: ours(m, i, True),
        "ours (hooks only)": lambda m, i: ours(m, i, False), "naive per-example loop": naive,
        "torch.func vmap(grad)": func_vmap, "opacus GradSampleModule": opacus,
    }
    runs, errors = {}, {}
    for name, make in variants.items():  # each variant gets its own model: hooks never overlap
        model, ids = build()
        try:
            runs[name] = make(model, ids)
            runs[name]()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            runs.pop(name, None)
    times: dict[str, list[float]] = {n: [] for n in runs}
    with console.status("timing") as status:
        for rep in range(warmup + reps):
            for name, run in runs.items():
                status.update(f"rep {rep + 1}/{warmup + reps}: {name}")
                t0 = time.perf_counter()
                run()
                if rep >= warmup:
                    times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain fwd+bwd"])
    table = Table(title=f"per-sample statistics, tiny Llama 16x64, {threads} threads, median of {reps}")
    best = min(times["plain fwd+bwd"])
    for col in ("variant", "median s", "x plain (median)", "x plain (best)"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    result = {"threads": threads, "reps": reps, "batch": [16, 64], "variants": {}, "errors": errors}
    for name, ts in times.items():
        med = statistics.median(ts)
        table.add_row(name, f"{med:.3f}", f"{med / base:.2f}", f"{min(ts) / best:.2f}")
        result["variants"][name] = {"median_s": med, "ratio": med / base, "ratio_best": min(ts) / best, "all_s": ts}
    for name, err in errors.items():
        table.add_row(name, "failed", err, "")
    console.print(table)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    result = measure(args.reps, args.warmup, args.threads)
    console = Console()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
