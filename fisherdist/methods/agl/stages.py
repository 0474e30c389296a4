"""The AlignGuard-LoRA pipeline: fisher -> train (every arm) -> eval, as stages that hand over files.

Files under ``out``: ``fisher/bases.safetensors`` (per-module top eigenpairs and residual levels of both K-FAC factors),
``fisher/ewc/`` (diagonal Fisher of the adapted base weights, safetensors shards + index), ``train_log_<arm>.json``,
``curves.json`` (forgetting curves), ``models/<arm>/`` (merged HF directories), ``drift_report.{json,png}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from fisherdist.data.jsonl import read_records
from fisherdist.errors import FisherdistError
from fisherdist.eval.alignment import AlignmentData
from fisherdist.methods.agl.adapters import ModuleBasis
from fisherdist.methods.agl.config import AglConfig
from fisherdist.methods.agl.fisher import Pairs, encode_pairs
from fisherdist.recipes.stages import RunContext

Ctx = RunContext[AglConfig]
BASIS_PARTS = ("vectors", "values", "residual", "in_vectors", "in_values", "in_residual")


def alignment_pairs(r: Ctx) -> Pairs:
    rows = [x for path in r.cfg.data.alignment for x in read_records(path, ["prompt", "response"])]
    return encode_pairs(r.tokenizer, rows)


def train_pairs(r: Ctx) -> Pairs:
    return encode_pairs(r.tokenizer, read_records(r.cfg.data.train, ["prompt", "response"]))


def eval_data(r: Ctx) -> AlignmentData:
    d = r.cfg.data
    return AlignmentData.from_files(d.unsafe, d.safe, d.task_eval, d.heldout, d.refusal)


def lora_scale(r: Ctx) -> float:
    return float(r.cfg.lora.alpha) / r.cfg.lora.r


def fisher(r: Ctx) -> None:
    """Alignment Fisher of the base model: per-module K-FAC output bases (AGL) and the diagonal (EWC)."""
    from safetensors.torch import save_file

    from fisherdist.methods.agl.fisher import alignment_bases, rank_batches, save_ewc_diagonal
    from fisherdist.models.sharded_load import load_wrapped

    f, m = r.cfg.fisher, r.cfg.model
    w = load_wrapped(m.path, r.dtype, r.cfg.dist.backend, r.env.device, load=m.load,
                     **r.cfg.backend_options(f.batch_size, None))
    device = next(w.unwrapped.parameters()).device
    batches = rank_batches(alignment_pairs(r), f.batch_size, f.max_length, r.pad_id, r.rank, r.world, device)
    bases = alignment_bases(w, batches, r.cfg.lora.targets, f.subspace)
    if r.rank == 0:
        (r.out / "fisher").mkdir(parents=True, exist_ok=True)
        flat = {f"{k}.{p}": getattr(b, p).contiguous().cpu() for k, b in bases.items() for p in BASIS_PARTS}
        save_file(flat, str(r.out / "fisher" / "bases.safetensors"))
    if "ewc" in r.cfg.train.arms:
        save_ewc_diagonal(w, batches, r.cfg.lora.targets, r.out / "fisher" / "ewc")
    r.log(f"agl fisher: {len(bases)} modules, subspace m={f.subspace}, {len(batches)} micro-batches per rank")


def _fisher_file(r: Ctx, name: str, arm: str) -> Any:
    """``out/fisher/<name>``, or one line saying which stage writes it (before any model loads)."""
    path = r.out / "fisher" / name
    if not path.is_file():
        raise FisherdistError(f"{path}: missing; the {arm} arm needs `fisherdist agl fisher` run first with {arm!r} "
                              f"in train.arms (out={r.out})")
    return path


def load_bases(r: Ctx) -> dict[str, ModuleBasis]:
    from safetensors.torch import load_file

    path = _fisher_file(r, "bases.safetensors", "agl")
    flat = load_file(str(path))
    names = sorted({k.rsplit(".", 1)[0] for k in flat})
    return {n: ModuleBasis(*(flat[f"{n}.{p}"] for p in BASIS_PARTS)) for n in names}


def ewc_rows(r: Ctx) -> Callable[[str, int, int], torch.Tensor]:
    """Reads rows [lo, hi) of one module's EWC diagonal from ``fisher/ewc/`` (a rank loads only the rows its
    penalty share needs)."""
    from safetensors import safe_open

    from fisherdist.models.sharded_load import safetensors_files

    files = safetensors_files(_fisher_file(r, "ewc/model.safetensors.index.json", "ewc").parent)

    def rows(name: str, lo: int, hi: int) -> torch.Tensor:
        with safe_open(str(files[name]), framework="pt") as f:
            part: torch.Tensor = f.get_slice(name)[lo:hi]
            return part

    return rows


def train(r: Ctx) -> None:
    """Fine-tune every arm (plain LoRA, LoRA + EWC, AlignGuard-LoRA) on the same data and steps."""
    from fisherdist.methods.agl.run_arm import train_arm

    for arm, name in (("agl", "bases.safetensors"), ("ewc", "ewc/model.safetensors.index.json")):
        if arm in r.cfg.train.arms:
            _fisher_file(r, name, arm)
    path = r.out / "curves.json"
    curves: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}  # other arms' runs stay
    for arm in r.cfg.train.arms:
        curves[arm] = train_arm(r, arm)
    r.write_json("curves.json", curves)


def evaluate(r: Ctx) -> None:
    """Base and every arm's merged model: refusal, over-refusal, task accuracy, perplexity -> report.
    Each model is loaded as the run's config says (``recipes.lora_run.plain_model``: one copy sharded over
    the ranks with ``model.load=sharded`` or ZeRO-3, else one per rank); the ranks split the prompts."""
    from fisherdist.eval.alignment import evaluate as eval_model
    from fisherdist.eval.alignment import write_drift_report
    from fisherdist.recipes.lora_run import plain_model

    data = eval_data(r)

    def one(path: Any) -> dict[str, float]:
        return eval_model(plain_model(r, path), r.tokenizer, data)

    before = one(r.cfg.model.path)
    after = {arm: one(r.out / "models" / arm) for arm in r.cfg.train.arms}
    curves_file = r.out / "curves.json"
    curves = json.loads(curves_file.read_text()) if curves_file.is_file() else {}
    if r.rank == 0:
        report = write_drift_report(r.out, before, after, curves)
        r.log(json.dumps(report["summary"], indent=1))
