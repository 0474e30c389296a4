"""Per-method learning-rate / retain-weight sweep for the VILA / FILA / GD-LoRA comparison (issue 13).

    python bench/vila_sweep.py --out bench/results/vila_sweep.json --methods gd_lora --lrs 1e-4,3e-4 [--retain-weights 1,2]

Rerunning with the same --out adds points (each method's grid can be centred where it starts to move).

Every method gets the same step budget (the tiny recipe's 5 epochs = 25 steps) and the same grid; only the
unlearning loss is the method's own (IHL for VILA and FILA as in the recipe, gradient difference for the
plain-LoRA baseline, as the issue names it). The importance pass and the initialisation are run once per
method; each grid point reruns ``train`` and ``eval`` on a copy of them.

Selection rule (the same for every method): among the points that meet the issue's three targets (forget
accuracy <= 1/3 of the base model's, retain accuracy >= 85% of it, held-out perplexity within +10%), the
highest forget quality (KS p-value against the retain-only model); ties broken by model utility, then by
the smaller learning rate. The chosen settings go into ``configs/vila/tiny.yaml`` (``per_method``) and
``bench/vila.py`` (``BASELINE``). Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vila import TINY, plain_lora_init, targets
from fisherdist.cli import main

LOSS = {"vila": "ihl", "fila": "ihl", "gd_lora": "gd"}


def _prepare(name: str, work: Path) -> Path:
    """Importance + init once (VILA / FILA), or PEFT's default factors on the unchanged base (baseline)."""
    prep = work / name / "prep"
    if (prep / "init" / "factors.pt").is_file():
        return prep
    if name == "gd_lora":
        plain_lora_init(prep)
        return prep
    for stage in ("importance", "init"):
        if main(["vila", stage, str(TINY), f"out={prep}", f"method={name}"]) != 0:
            raise SystemExit(f"{name}: stage {stage} failed")
    return prep


def _point(name: str, prep: Path, lr: float, rw: float, extra: list[str]) -> dict[str, Any]:
    out = prep.parent / f"lr{lr:g}_rw{rw:g}"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(prep / "init", out / "init")
    shutil.copytree(prep / "models" / "base", out / "models" / "base")
    method = "fila" if name == "fila" else "vila"  # the baseline only uses train + eval (no importance)
    args = [f"out={out}", f"method={method}", f"train.loss={LOSS[name]}", f"train.lr={lr}", f"train.retain_weight={rw}", *extra]
    start = time.perf_counter()
    for stage in ("train", "eval"):
        if main(["vila", stage, str(TINY), *args]) != 0:
            raise SystemExit(f"{name} {args}: stage {stage} failed")
    summary = json.loads((out / "report.json").read_text())["summary"]
    shutil.rmtree(out / "models")  # 20 MB per point; the report is what the sweep keeps
    return {"lr": lr, "retain_weight": rw, "loss": LOSS[name], "summary": summary, "targets": targets(summary),
            "seconds": round(time.perf_counter() - start, 1)}


def choose(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The selection rule: targets met, then forget quality, then utility, then the smaller lr."""
    ok = [p for p in points if all(v is not False for v in p["targets"].values())]
    key = lambda p: (p["summary"]["forget_quality"][1] or 0.0, p["summary"]["model_utility"][1], -p["lr"])  # noqa: E731
    return max(ok, key=key) if ok else None


def _plot(path: Path, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, m in doc["methods"].items():
        for rw in sorted({p["retain_weight"] for p in m["points"]}):
            pts = sorted((p for p in m["points"] if p["retain_weight"] == rw), key=lambda p: p["lr"])
            lrs = [p["lr"] for p in pts]
            for ax, get in zip(axes, (lambda s: s["forget_quality"][1], lambda s: s["model_utility"][1],
                                      lambda s: s["retain_accuracy_ratio"])):
                ax.plot(lrs, [get(p["summary"]) for p in pts], marker="o", label=f"{name} rw {rw:g}")
    for ax, title in zip(axes, ("forget quality (KS p, log)", "model utility", "retain acc / base")):
        ax.set_xscale("log")
        ax.set_xlabel("lr")
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[2].axhline(0.85, ls="--", color="gray")
    axes[1].legend(fontsize=7)
    fig.suptitle("tiny world, 25 steps: per-method sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save(out_json: Path, name: str, method: dict[str, Any], command: str) -> dict[str, Any]:
    """Read, update this method's entry, write: sweeps of different methods can run side by side."""
    doc: dict[str, Any] = {"commands": [], "rule": choose.__doc__, "methods": {}}
    if out_json.is_file():
        doc.update({k: json.loads(out_json.read_text())[k] for k in ("commands", "methods")})
    if command not in doc["commands"]:
        doc["commands"].append(command)
    doc["methods"][name] = {"points": method["points"], "chosen": choose(method["points"])}
    out_json.write_text(json.dumps(doc, indent=1))
    return doc


def run(out_json: Path, methods: list[str], lrs: list[float], rws: list[float], extra: list[str]) -> dict[str, Any]:
    """Every (lr, retain weight) not yet in ``out_json`` for each method; points already there are kept."""
    work, command = out_json.parent / "vila_sweep_runs", " ".join(["python", *sys.argv])
    old = json.loads(out_json.read_text())["methods"] if out_json.is_file() else {}
    doc: dict[str, Any] = {}
    for name in methods:
        m = {"points": list(old.get(name, {}).get("points", []))}
        done = {(p["lr"], p["retain_weight"]) for p in m["points"]}
        prep = _prepare(name, work)
        for rw in rws:
            for lr in lrs:
                if (lr, rw) not in done:
                    m["points"].append(_point(name, prep, lr, rw, extra))
                    doc = _save(out_json, name, m, command)
        doc = _save(out_json, name, m, command)
    _plot(out_json.with_suffix(".png"), doc)
    return doc


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/vila_sweep.json"))
    p.add_argument("--methods", default="gd_lora,fila,vila")
    p.add_argument("--lrs", default="1e-5,2e-5,5e-5,1e-4,2e-4,5e-4,1e-3")
    p.add_argument("--retain-weights", default="1,2")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    doc = run(a.out, a.methods.split(","), floats(a.lrs), floats(a.retain_weights), a.overrides)
    print(json.dumps({k: m["chosen"] for k, m in doc["methods"].items()}, indent=1))
