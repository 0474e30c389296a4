"""The SUV pipeline: mine -> prefs -> fisher -> train (+ export) -> eval, as stages that hand over files.

Files under ``out``: ``mined.jsonl``, ``prefs.jsonl`` (stages 1-2), ``fisher_{forbidden,retain}/`` (DCP),
``train_log.json``, ``models/{base,adapter,unlearned}/``, ``protected.jsonl``, ``report.json`` /
``report.png``. Every rank runs every stage; rank 0 writes the files. ``fisher`` and ``train`` share the
wrapped training model (and the barrier) through the context's ``state`` when they run in one process.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from fisherdist.distributed.collectives import barrier
from fisherdist.methods.suv import stages
from fisherdist.recipes.stages import StageRegistry

Ctx = stages.Ctx


def wrapped_model(r: Ctx) -> Any:
    """Base model + fresh LoRA (B = 0), wrapped for the backend, with the optimizer (loaded once per run)."""
    if "wrapped" not in r.state:
        from fisherdist.models.peft_utils import apply_lora
        from fisherdist.models.sharded_load import load_wrapped

        t, m = r.cfg.train, r.cfg.model
        opt = lambda ps: torch.optim.AdamW(ps, lr=t.lr, weight_decay=t.weight_decay)  # noqa: E731
        r.state["wrapped"] = load_wrapped(m.path, r.dtype, r.cfg.dist.backend, r.env.device, load=m.load,
                                          prepare=lambda base: apply_lora(base, r.cfg.lora), optimizer_factory=opt,
                                          seed=t.seed, **r.cfg.backend_options(t.batch_size, t.max_grad_norm))
    return r.state["wrapped"]


def _pairs(r: Ctx) -> list:
    return stages.load_pairs(r.out / "prefs.jsonl", r.tokenizer, r.cfg.train.max_length)


def _retain(r: Ctx, max_length: int) -> list[list[int]]:
    from fisherdist.data.batches import load_texts, tokenize

    d = r.cfg.data
    return tokenize(load_texts(d.retain, d.text_field, r.cfg.fisher.retain_samples), r.tokenizer, max_length)


def fisher(r: Ctx) -> None:
    """Stage 3: forbidden and retain Fisher of the frozen base -> ``fisher_{forbidden,retain}/``."""
    from fisherdist.methods.suv.fisher_pass import compute_and_save

    fs = r.cfg.fisher
    forbid = [p.prompt + p.rejected for p in _pairs(r)[: fs.forbid_samples]]
    retain = _retain(r, fs.max_length)
    r.log(f"[bold]fisher[/]: {len(forbid)} forbidden and {len(retain)} retain samples")
    r.state["barrier"] = compute_and_save(wrapped_model(r), forbid, retain, fs, r.cfg.lora, r.pad_id, r.out)


def train(r: Ctx) -> None:
    """Stage 4: DPO + lambda R_Fisher (+ projection) on the adapter -> ``models/{base,adapter,unlearned}``."""
    from fisherdist.methods.suv.fisher_pass import load_barrier
    from fisherdist.methods.suv.train import SuvTrainer
    from fisherdist.models.export import export_adapter, save_base_copy

    w, t, fs = wrapped_model(r), r.cfg.train, r.cfg.fisher
    if "barrier" not in r.state and fs.enabled:
        r.state["barrier"] = load_barrier(w, fs, r.cfg.lora, r.out)
    retain = _retain(r, t.max_length) if t.projection else []
    pairs = _pairs(r)
    r.log(f"[bold]train[/]: {len(pairs)} preference pairs, backend {r.cfg.dist.backend} x {r.world}")
    history = SuvTrainer(w, pairs, retain, t, r.pad_id, r.state.get("barrier") if fs.enabled else None,
                         checkpoint_dir=r.out / "checkpoints" / "train").run()
    tensors = w.gather_trainable()
    models = r.out / "models"
    if r.rank == 0:
        (r.out / "train_log.json").write_text(json.dumps(history, indent=1))
        save_base_copy(r.cfg.model.path, models / "base", r.dtype, r.cfg.base_copy)
        export_adapter(tensors, r.cfg.model.path, r.cfg.lora, models / "adapter", models / "unlearned", r.dtype)
    barrier()
    first, last = history[0], history[-1]
    r.log(f"train: dpo {first['dpo']:.4f} -> {last['dpo']:.4f}, R_Fisher {first['fisher_reg']:.4g} -> "
          f"{last['fisher_reg']:.4g} over {len(history)} steps")


STAGES = StageRegistry("suv", [("mine", stages.mine), ("prefs", stages.prefs), ("fisher", fisher),
                               ("train", train), ("eval", stages.eval)])
