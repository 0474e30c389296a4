"""The LQ-LoRA pipeline: fisher -> decompose -> train -> export, as stages that hand over files under ``out``.

``fisher/`` (elementwise Fisher per matrix, on its decomposing rank), ``costs.json`` / ``plan.json`` (cost
tables and the ILP), ``decomposition/`` (Q packed + L1 + L2 by matrix), ``models/decomposed/`` (dense
Q + L1 L2), ``models/lqlora/`` (packed Q + trained LoRA, :func:`~fisherdist.models.quant_lora.load_quantized_lora`),
``models/merged/`` (dense Q + s B A after fine-tuning), ``train_log.json``, ``report.json``.
"""

from __future__ import annotations

import json
from typing import Any

import torch.distributed as dist

from fisherdist.atomic import write_text
from fisherdist.distributed.collectives import barrier, is_main
from fisherdist.methods.lqlora.placement import Target, find_targets
from fisherdist.methods.lqlora.stage import Options
from fisherdist.methods.lqlora.train_stage import Ctx, export, train
from fisherdist.recipes.stages import StageRegistry


def _targets(r: Ctx) -> list[Target]:
    return find_targets(r.cfg.model.path, r.cfg.decompose.targets)


def fisher(r: Ctx) -> None:
    """Calibration Fisher of every target matrix through the sharded engine -> ``fisher/`` (per owner)."""
    from fisherdist.data.batches import load_texts, tokenize
    from fisherdist.methods.lqlora.fisher_stage import owners, reduce_to_owners, save_parts
    from fisherdist.models.sharded_load import load_wrapped
    from fisherdist.recipes.fisher_pass import run_pass

    fs, m = r.cfg.fisher, r.cfg.model
    if not fs.enabled:
        r.log("fisher: disabled (data-agnostic LQ-LoRA)")
        return
    targets = _targets(r)
    tokens = tokenize(load_texts(r.cfg.data.calibration, r.cfg.data.text_field, fs.samples), r.tokenizer, fs.max_length)
    w = load_wrapped(m.path, r.dtype, r.cfg.dist.backend, r.env.device, load=m.load,
                     **r.cfg.backend_options(fs.batch_size, None))
    acc = run_pass(w, tokens, fs, [t.name for t in targets], r.pad_id, metrics=r.metrics)
    owner = owners(targets, r.world)
    save_parts(r.out / "fisher", reduce_to_owners(acc, targets, owner), owner)
    acc.close()
    r.log(f"fisher: {len(tokens)} sequences, {len(targets)} matrices -> {r.out / 'fisher'}")


def _options(r: Ctx, cost: bool) -> Options:
    d = r.cfg.decompose
    iters = (d.cost_iters or d.iters) if cost else d.iters
    return Options(r.cfg.lora.r, iters, d.svd, str(r.out / "fisher") if r.cfg.fisher.enabled else None)


def _plan(r: Ctx) -> dict[str, str]:
    """Cost tables on every rank (whole matrices each), the ILP on rank 0, the plan broadcast."""
    from fisherdist.methods.lqlora.allocate import parse_costs, solve
    from fisherdist.methods.lqlora.stage import cost_table

    d = r.cfg.decompose
    table = cost_table(r.cfg.model.path, d.configs(), _options(r, cost=True), d.targets)
    box: list[Any] = [None]
    if is_main():
        write_text(r.out / "costs.json", json.dumps(table, indent=1) + "\n")
        plan, optimal = solve(parse_costs(table, str(r.out / "costs.json")), d.budget, d.time_limit)
        write_text(r.out / "plan.json", json.dumps({**plan, "optimal": optimal}, indent=1) + "\n")
        box[0] = plan["assignment"]
    if dist.is_initialized() and r.world > 1:
        dist.broadcast_object_list(box, src=0)
    return dict(box[0])


def decompose(r: Ctx) -> None:
    """Cost tables, the ILP under the budget, then Q + L1 L2 per matrix -> ``decomposition/``, ``models/decomposed/``."""
    from fisherdist.methods.lqlora.export import Decomposition
    from fisherdist.methods.lqlora.stage import decompose_plan
    from fisherdist.models.export import rewrite_checkpoint

    d, m = r.cfg.decompose, r.cfg.model
    assignment = {t.name: d.qconfig for t in _targets(r)} if d.qconfig else _plan(r)
    folder = decompose_plan(m.path, r.out / "decomposition", assignment, _options(r, cost=False), d.targets)
    if is_main():
        dec = Decomposition(folder)
        rewrite_checkpoint(m.path, r.out / "models" / "decomposed",
                           lambda n, w: dec.dense(n) if n in dec.matrices else w, r.dtype)
    barrier()
    r.log(f"decompose: {len(assignment)} matrices -> {folder}, models/decomposed")


STAGES = StageRegistry("lqlora", [("fisher", fisher), ("decompose", decompose), ("train", train), ("export", export)])
