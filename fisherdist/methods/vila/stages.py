"""The stages of ``fisherdist vila``; each hands files over under ``out``:

    importance -> importance/rows.pt (sum_j I_ij per module) + importance/importance.json
    init       -> models/base (W - s*B0*A0) + init/factors.pt (A0, B0)
    train      -> models/adapter (PEFT, applies to models/base) + models/unlearned (merged HF) + train_log.json
    eval       -> report.json + report.png (TOFU metrics before / after, forget quality vs the retain-only model)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from fisherdist.methods.vila.config import VilaConfig
from fisherdist.recipes.stages import RunContext, StageRegistry

Ctx = RunContext[VilaConfig]


def _load(r: Ctx, path: str | Path, lora_init: Any, micro_batch: int, optimizer_factory: Any = None,
          max_grad_norm: float | None = None) -> Any:
    from fisherdist.models.peft_utils import apply_lora
    from fisherdist.models.sharded_load import load_wrapped

    return load_wrapped(str(path), r.dtype, r.cfg.dist.backend, r.env.device, load=r.cfg.model.load,
                        prepare=lambda base: apply_lora(base, r.cfg.lora), lora_init=lora_init,
                        optimizer_factory=optimizer_factory, seed=r.cfg.train.seed,
                        **r.cfg.backend_options(micro_batch, max_grad_norm))


def _save_rank0(r: Ctx, obj: Any, rel: str) -> None:
    """torch.save by rank 0 to a temporary sibling, then renamed (never a half-written file)."""
    if r.rank != 0:
        return
    path = r.out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def importance(r: Ctx) -> None:
    """Forget and retain Fisher in one pass -> per-row importance of every adapted weight."""
    from fisherdist.eval.tofu import tofu_records
    from fisherdist.fisher import FisherAccumulator
    from fisherdist.methods.vila.data import qa_pairs, rank_batches
    from fisherdist.methods.vila.importance import importance_spec, one_pass, row_importance
    from fisherdist.methods.vila.init import gaussian_init

    c, imp = r.cfg, r.cfg.importance
    for path in (c.data.forget, c.data.retain):  # the eval stage needs them: fail before any compute
        tofu_records(path)
    hook = gaussian_init(imp.sigma, c.train.seed) if c.method == "vila" else None
    w = _load(r, c.model.path, hook, imp.batch_size)
    acc = FisherAccumulator(w, importance_spec(c.method, c.lora, imp.dtype))
    batches = [rank_batches(qa_pairs(r.tokenizer, p), imp.batch_size, r.rank, r.world, r.pad_id, imp.max_length,
                            r.env.device) for p in (c.data.forget, c.data.retain)]
    start = time.perf_counter()
    one_pass(w, acc, *batches, passes=imp.passes)
    rows = row_importance(c.method, acc)
    seconds = time.perf_counter() - start
    stat_bytes = sum(b.numel() * b.element_size() for s in acc.states.values() for d in s.buffers.values() for b in d.values())
    counts = {s: acc.states[s].global_counts() for s in ("forget", "retain")}
    acc.close()
    _save_rank0(r, rows, "importance/rows.pt")
    r.write_json("importance/importance.json", {"method": c.method, "seconds": round(seconds, 3), "counts": counts,
                                                "statistics_bytes_rank0": stat_bytes, "modules": len(rows)})
    r.log(f"{c.method} importance: {len(rows)} modules in {seconds:.2f} s")


def init(r: Ctx) -> None:
    """Fisher-weighted low-rank factors per module; the base rewritten to W - s*B0*A0."""
    from fisherdist.methods.vila.init import fisher_init
    from fisherdist.models.lora_base import export_base, lora_tensors

    rows = torch.load(r.out / "importance" / "rows.pt", weights_only=True)
    w = _load(r, r.cfg.model.path, fisher_init(rows, r.cfg.train.seed), r.cfg.train.batch_size)
    export_base(w.unwrapped, r.cfg.model.path, r.out / "models" / "base", merge=False)
    _save_rank0(r, lora_tensors(w.unwrapped), "init/factors.pt")


def _set_saved(factors: dict[str, torch.Tensor]) -> Any:
    from fisherdist.models.lora_base import set_factors

    def hook(model: torch.nn.Module) -> None:
        set_factors(model, lambda m: (factors[f"{m.name}.lora_A.default.weight"], factors[f"{m.name}.lora_B.default.weight"]))

    return hook


def train(r: Ctx) -> None:
    """Unlearn on the adapter (GD / IHL / NPO + retain NLL) -> models/adapter, models/unlearned."""
    from fisherdist.methods.vila.data import qa_pairs
    from fisherdist.methods.vila.train import UnlearnLoss
    from fisherdist.models.lora_base import export_base, save_adapter
    from fisherdist.recipes.losses import FrozenAdapter
    from fisherdist.recipes.trainer import Trainer

    c, t = r.cfg, r.cfg.train
    factors = torch.load(r.out / "init" / "factors.pt", weights_only=True)
    opt = lambda ps: torch.optim.AdamW(ps, lr=t.lr, weight_decay=t.weight_decay)  # noqa: E731
    w = _load(r, r.out / "models" / "base", _set_saved(factors), t.batch_size, opt, t.max_grad_norm)
    reference = FrozenAdapter(w.unwrapped) if t.loss == "npo" else None  # the initial adapter, swapped in
    forget, retain = qa_pairs(r.tokenizer, c.data.forget), qa_pairs(r.tokenizer, c.data.retain)
    loss = UnlearnLoss(w, forget, retain, t, r.pad_id, reference)
    history = Trainer(w, len(forget), t, loss, checkpoint_dir=r.out / "checkpoints" / "train", name=f"{c.method} train",
                      fingerprint=c.method, metrics=r.metrics).run()
    r.write_json("train_log.json", history)
    save_adapter(w.unwrapped, r.out / "models" / "adapter", r.out / "models" / "base")  # on the rewritten base
    export_base(w.unwrapped, c.model.path, r.out / "models" / "unlearned", merge=True)


def evaluate(r: Ctx) -> None:
    """TOFU metrics of the original and the unlearned model -> report.json, report.png."""
    from fisherdist.methods.vila.report import evaluate_run

    doc = evaluate_run(r)
    r.log(json.dumps({k: doc[k] for k in ("summary",)}, indent=1))


STAGES = StageRegistry("vila", [("importance", importance), ("init", init), ("train", train), ("eval", evaluate)])
