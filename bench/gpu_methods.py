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


def vila(args: argparse.Namespace, build: Callable[[argparse.Namespace], torch.nn.Module],
         timed: Callable[..., dict[str, Any]], planned_gib: Callable[..., float]) -> dict[str, Any]:
    """VILA's importance pass (centered Fisher of the LoRA factors) vs FILA's (Fisher of the frozen base
    weights), one forget + one retain micro-batch per timed step, LoRA r=8 on all 7 projections (as
    configs/vila and the planner)."""
    from fisherdist.distributed.wrap import wrap_model
    from fisherdist.fisher import FisherAccumulator
    from fisherdist.methods.vila.importance import importance_spec, one_pass
    from fisherdist.models.peft_utils import LoraSettings, apply_lora

    lora = LoraSettings(dropout=0.0, targets=[f"{p}_proj" for p in ("q", "k", "v", "o", "gate", "up", "down")])
    w = wrap_model(apply_lora(build(args), lora), "none")
    ids = torch.randint(0, w.unwrapped.config.vocab_size, (args.batch, args.seq), device=args.device)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
             "valid": torch.ones(args.batch, dtype=torch.bool, device=args.device)}
    out: dict[str, Any] = {}
    for method in ("vila", "fila"):
        acc = FisherAccumulator(w, importance_spec(method, lora))
        out[method] = timed(lambda acc=acc: one_pass(w, acc, [batch], [batch]), args)
        out[method]["planned_gib"] = planned_gib(args, "--method", method, "--optimizer", "none")
        out[method]["statistics_bytes"] = sum(t.numel() * t.element_size() for s in acc.states.values()
                                              for b in s.buffers.values() for t in b.values())
        acc.close()
        del acc
    out["fila"]["ratio"] = out["fila"]["median_s"] / out["vila"]["median_s"]
    return out


def agl(args: argparse.Namespace, timed: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """AlignGuard-LoRA's penalty terms (forward + backward) over every q,k,v,o module of the 7B shape
    (128 modules of 4096 x 4096; basis m = 128, r = 8, 16 input eigenpairs), one rank's whole share."""
    from fisherdist.methods.agl.penalty import AglWeights, ModuleFactors, combine, local_sums

    modules, d, m, r, k = (4, 64, 8, 4, 4) if args.smoke else (128, 4096, 128, 8, 16)
    g = torch.Generator(device=args.device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=args.device, generator=g)  # noqa: E731
    basis = torch.linalg.qr(rnd(d, m))[0]
    bs = [rnd(d, r).requires_grad_() for _ in range(modules)]
    factors = [ModuleFactors(u=basis, lam=rnd(m).abs(), sigma=rnd(1).abs()[0], v=torch.linalg.qr(rnd(d, k))[0],
                             mu=rnd(k).abs(), rho=rnd(1).abs()[0], c=rnd(m, r).requires_grad_(),
                             a_align=rnd(r, d).requires_grad_(), b=b, a_task=rnd(r, d).requires_grad_(), u_all=basis,
                             b_all=b, scale=2.0)
               for b in bs]
    weights, numel = AglWeights(), torch.full((modules,), float(d * d), device=args.device)

    def step() -> None:
        combine(torch.stack([local_sums(f, weights) for f in factors]), numel, weights)["loss"].backward()

    return {"penalty": {**timed(step, args), "modules": modules, "shape": [d, d], "basis": m, "rank": r}}
