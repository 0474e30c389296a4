"""One arm of ``fisherdist agl train``: load (whole or sharded: ``model.load``), attach, fine-tune with the
SFT recipe (``run_sft``, the arm's penalty and the forgetting curve as its hooks), export merged (streamed)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fisherdist.methods.agl import stages
from fisherdist.methods.agl.train import AglPenalty, EwcPenalty, ForgettingCurve
from fisherdist.methods.sft import run_sft
from fisherdist.recipes.trainer import DataPlan, TrainHook


def _prepare(r: stages.Ctx, arm: str) -> Any:
    from fisherdist.methods.agl.adapters import attach
    from fisherdist.models.peft_utils import apply_lora

    bases = stages.load_bases(r) if arm == "agl" else {}

    def prepare(base: nn.Module) -> nn.Module:
        model = apply_lora(base, r.cfg.lora)
        if arm == "agl":
            attach(model, bases, r.cfg.train.align_rank, stages.lora_scale(r), r.cfg.train.seed)
        return model

    return prepare


def _penalty(r: stages.Ctx, arm: str, wrapped: Any) -> list[TrainHook]:
    t = r.cfg.train
    if arm == "agl":
        return [AglPenalty(wrapped, t.weights, stages.lora_scale(r))]
    if arm == "ewc":
        return [EwcPenalty(wrapped, stages.ewc_rows(r), t.lambda_ewc, stages.lora_scale(r))]
    return []


def train_arm(r: stages.Ctx, arm: str) -> list[tuple[int, float]]:
    """Fine-tune ``arm`` -> ``models/<arm>`` and ``train_log_<arm>.json``; returns its forgetting curve."""
    from fisherdist.models.sharded_load import load_wrapped

    t, m = r.cfg.train, r.cfg.model
    w = load_wrapped(m.path, r.dtype, r.cfg.dist.backend, r.env.device, load=m.load, prepare=_prepare(r, arm),
                     optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=t.lr, weight_decay=t.weight_decay),
                     seed=t.seed, **r.cfg.backend_options(t.batch_size, t.max_grad_norm))
    pairs = stages.train_pairs(r)
    total = DataPlan(len(pairs), t.batch_size * r.world, t.epochs, t.seed, t.max_steps).total_steps
    curve = ForgettingCurve(w.module, r.tokenizer, stages.eval_data(r), t.curve_every, total)
    history = run_sft(w, pairs, t, r.pad_id, checkpoint_dir=r.out / "checkpoints" / arm, hooks=[*_penalty(r, arm, w), curve],
                      name=arm, progress=False, metrics=r.metrics)
    r.write_json(f"train_log_{arm}.json", history)
    _export(r, arm, w)
    r.log(f"agl {arm}: {len(history)} steps, unsafe refusal {curve.points[0][1]:.2f} -> {curve.points[-1][1]:.2f}")
    return curve.points


def _export(r: stages.Ctx, arm: str, wrapped: Any) -> None:
    """``models/<arm>``: base + s B A (+ dW_A for AGL) as one merged HF directory, streamed (every rank
    gathers one base tensor at a time, rank 0 writes; only the small factors are gathered whole)."""
    from fisherdist.methods.agl.adapters import merged_delta
    from fisherdist.models.lora_base import export_base

    export_base(wrapped.unwrapped, r.cfg.model.path, r.out / "models" / arm, merge=True,
                extra=merged_delta() if arm == "agl" else None)
