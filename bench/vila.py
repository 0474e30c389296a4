"""VILA vs FILA vs plain gradient-difference LoRA on the tiny world at the same step budget, in ONE run.

    python bench/vila.py --out bench/results/vila.json [key=value ...]   # overrides of configs/vila/tiny.yaml

1. ``fisherdist vila run`` with ``method=vila`` and ``method=fila`` (importance, Fisher-weighted init,
   training, TOFU evaluation), each with its own lr / retain weight from the recipe's ``per_method``; the
   importance pass's seconds and its statistics' bytes come from ``importance/importance.json``.
2. The baseline: PEFT's default LoRA init (B = 0) on the unchanged base, then the same ``train`` and
   ``eval`` stages with gradient difference at ``BASELINE`` (same steps, seed, data order).
   ``per_method`` and ``BASELINE`` are what bench/vila_sweep.py's selection rule chose for each method.
3. The issue's targets per run: forget accuracy <= 1/3 of the base model's, retain accuracy >= 85% of it,
   held-out perplexity within +10%; forget quality (KS p-value, when a retain-only model is configured)
   and model utility against the baseline. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fisherdist.cli import main

TINY = Path(__file__).resolve().parents[1] / "configs" / "vila" / "tiny.yaml"
BASELINE = ["train.loss=gd", "train.lr=1e-3", "train.retain_weight=1"]  # plain GD LoRA, bench/vila_sweep.py


def plain_lora_init(out: Path) -> None:
    """models/base = the original model, init/factors.pt = PEFT's default factors (B = 0)."""
    import torch

    from fisherdist.config import default_world_dir
    from fisherdist.models.load import load_model
    from fisherdist.models.lora_base import export_base, lora_tensors
    from fisherdist.models.peft_utils import LoraSettings, apply_lora

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = apply_lora(load_model(default_world_dir() / "model"), LoraSettings(r=8, alpha=16, dropout=0.0, targets=targets))
    export_base(model, default_world_dir() / "model", out / "models" / "base", merge=False)
    (out / "init").mkdir(parents=True, exist_ok=True)
    torch.save(lora_tensors(model), out / "init" / "factors.pt")


def _run(name: str, out: Path, stages: list[str], extra: list[str]) -> dict[str, Any]:
    for stage in stages:
        if main(["vila", stage, str(TINY), f"out={out / name}", *extra]) != 0:
            raise SystemExit(f"{name}: stage {stage} failed")
    report = json.loads((out / name / "report.json").read_text())
    imp = out / name / "importance" / "importance.json"
    return {"summary": report["summary"], "importance": json.loads(imp.read_text()) if imp.is_file() else None}


def targets(s: dict[str, Any]) -> dict[str, bool | None]:
    ppl = s["perplexity_ratio"]
    return {"forget_le_third": s["forget_accuracy_ratio"] is not None and s["forget_accuracy_ratio"] <= 1 / 3,
            "retain_ge_85pct": s["retain_accuracy_ratio"] is not None and s["retain_accuracy_ratio"] >= 0.85,
            "ppl_within_10pct": None if ppl is None else ppl <= 1.10}


def versus(s: dict[str, Any], base: dict[str, Any]) -> dict[str, bool]:
    """The issue's comparison with the baseline: higher forget quality (ties: utility) at equal or better utility."""
    fq, fq0, mu, mu0 = s["forget_quality"][1], base["forget_quality"][1], s["model_utility"][1], base["model_utility"][1]
    return {"forget_quality_higher": fq > fq0 or (fq == fq0 and mu > mu0), "utility_equal_or_better": mu >= mu0}


def _plot(path: Path, runs: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["forget_accuracy_ratio", "retain_accuracy_ratio", "perplexity_ratio"]
    fig, ax = plt.subplots(figsize=(9, 4))
    for j, (name, r) in enumerate(runs.items()):
        bars = ax.bar([i + (j - 1) * 0.27 for i in range(len(keys))], [r["summary"][k] or 0 for k in keys], 0.27, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1 / 3, ls=":", color="gray")
    ax.axhline(0.85, ls="--", color="gray")
    ax.set_xticks(range(len(keys)), ["forget acc / base", "retain acc / base", "ppl / base"])
    ax.legend()
    ax.set_title("tiny world: unlearning at the same step budget")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(out_json: Path, extra: list[str]) -> dict[str, Any]:
    work = out_json.parent / "vila_runs"
    runs = {"vila": _run("vila", work, ["run"], ["method=vila", *extra]),
            "fila": _run("fila", work, ["run"], ["method=fila", *extra])}
    plain_lora_init(work / "gd_lora")
    runs["gd_lora"] = _run("gd_lora", work, ["train", "eval"], [*BASELINE, *extra])  # the baseline
    for r in runs.values():
        r["targets"] = targets(r["summary"])
    for name in ("vila", "fila"):
        runs[name]["versus_gd_lora"] = versus(runs[name]["summary"], runs["gd_lora"]["summary"])
    v, f = runs["vila"]["importance"], runs["fila"]["importance"]
    doc = {"command": f"python bench/vila.py --out {out_json} {' '.join(extra)}".strip(), "runs": runs,
           "importance_speedup_vila_over_fila": f["seconds"] / v["seconds"],
           "importance_statistics_bytes": {"vila": v["statistics_bytes_rank0"], "fila": f["statistics_bytes_rank0"]}}
    out_json.write_text(json.dumps(doc, indent=1))
    _plot(out_json.with_suffix(".png"), runs)
    return doc


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/vila.json"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    print(json.dumps(run(a.out, a.overrides), indent=1))
