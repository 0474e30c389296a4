"""GPU benchmark sections for the optimizer and quantization methods (``bench/gpu_step.py`` runs them).

``ngalore``: one training step (forward, backward, optimizer) of a 1B Llama architecture (Llama-3.2-1B
shape, random bf16 weights) with torch AdamW, GaLoreAdamW and NaturalGaLoreAdamW: the median non-refresh
step, the refresh step (the first step of a fresh optimizer computes every projector), the optimizer state
by part, and the peak against ``fisherdist plan --method ngalore``.
``lqlora``: the LQ decomposition (nf3, rank 64, randomized SVD) of one 4096 x 4096 Gaussian matrix on the
GPU: seconds per alternation and the relative Frobenius error against NF4.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

GALORE = {"rank": 256, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}


def _groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Attention / MLP Linear weights projected (galore-torch's recipe), the rest plain AdamW."""
    low = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ("attn" in n or "mlp" in n)]
    ids = {id(p) for p in low}
    return [{"params": low, **GALORE}, {"params": [p for p in model.parameters() if id(p) not in ids]}]


def _optimizers(model: torch.nn.Module, smoke: bool) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    from fisherdist.optim import GaLoreAdamW, NaturalGaLoreAdamW

    rank = 8 if smoke else GALORE["rank"]
    groups = lambda: [{**g, "rank": rank} if "rank" in g else dict(g) for g in _groups(model)]  # noqa: E731
    return {"adamw": lambda: torch.optim.AdamW(model.parameters(), lr=1e-5),
            "galore": lambda: GaLoreAdamW(groups(), lr=1e-5, subspace="randomized"),
            "natural_galore": lambda: NaturalGaLoreAdamW(groups(), lr=1e-5, subspace="randomized", history=4,
                                                         history_dtype=torch.bfloat16)}


def _state_parts(opt: torch.optim.Optimizer) -> dict[str, int]:
    if hasattr(opt, "state_bytes"):
        return dict(opt.state_bytes())
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"moments": moments}


def ngalore(args: argparse.Namespace, build: Callable[[argparse.Namespace], torch.nn.Module],
            timed: Callable[..., dict[str, Any]], planned_gib: Callable[..., float]) -> dict[str, Any]:
    """AdamW vs GaLore vs Natural GaLore full training steps on the 1B architecture."""
    from fisherdist.fisher.loss import per_sample_nll

    model = build(args)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    for name, make in _optimizers(model, args.smoke).items():
        opt = make()

        def step(opt: torch.optim.Optimizer = opt) -> None:
            per_sample_nll(model(input_ids=ids).logits, ids).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        step()  # the first step computes every projector: the refresh step
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        refresh_s = time.perf_counter() - t0
        res = timed(step, args)
        res.update(refresh_s=refresh_s, state_bytes=_state_parts(opt))
        out[name] = res
        del opt
    for name in ("galore", "natural_galore"):
        out[name]["ratio"] = out[name]["median_s"] / out["adamw"]["median_s"]
        out[name]["refresh_amortised"] = ((out[name]["refresh_s"] - out[name]["median_s"])
                                          / GALORE["update_proj_gap"] / out["adamw"]["median_s"])
    out["natural_galore"]["planned_gib"] = planned_gib(args, "--method", "ngalore", "--lora-r",
                                                       str(8 if args.smoke else GALORE["rank"]))
    return out


def lqlora(args: argparse.Namespace, *_: Any) -> dict[str, Any]:
    """LQ decomposition of one 4096 x 4096 matrix (smoke: 256 x 256, rank 8) on the benchmark's device."""
    from fisherdist.methods.lqlora.decompose import lq_decompose
    from fisherdist.models.quant import QConfig, quantize

    n, rank = (256, 8) if args.smoke else (4096, 64)
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(args.device)
    lq_decompose(w[:64, :64], QConfig.parse("nf3"), 4, 1)  # warm-up: kernels and the NF codebook
    t0 = time.perf_counter()
    res = lq_decompose(w, QConfig.parse("nf3"), rank, 5)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    nf4 = quantize(w, QConfig.parse("nf4")).dequantize()
    return {"decompose": {"median_s": seconds / len(res.errors), "shape": [n, n], "rank": rank, "iterations": len(res.errors),
                          "seconds": seconds, "rel_frobenius_lq_nf3": res.error ** 0.5 / float(w.norm()),
                          "rel_frobenius_nf4": float((w - nf4).norm() / w.norm())}}
