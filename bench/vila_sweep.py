"""Per-method learning-rate / retain-weight sweep for the VILA / FILA / GD-LoRA comparison (issue 13).

    python bench/vila_sweep.py --out bench/results/vila_sweep.json --methods gd_lora --lrs 1e-4,3e-4 [--retain-weights 1,2]

Rerunning with the same --out adds points (each method's grid can be centred where it starts to move).

Every method gets the same step budget (the tiny recipe's 5 epochs = 25 steps); the unlearning loss is the
method's own (IHL for VILA and FILA as in the recipe, gradient difference for the plain-LoRA baseline, as the
issue names it) unless --loss says otherwise. The importance pass and the initialisation are run once per
method; each grid point reruns ``train`` and ``eval`` on a copy of them.

Selection rule (``choose``): only points that meet the issue's three targets count (forget accuracy <= 1/3
of the base model's, retain accuracy >= 85% of it, held-out perplexity within +10%). The baseline takes
its highest forget quality (KS p-value against the retain-only model; ties: utility, then the smaller lr).
VILA and FILA are compared as the issue asks, "higher forget quality at equal or better utility": each
takes its highest forget quality among its points at the baseline's utility or above, when that beats the
baseline; otherwise its highest forget quality overall, and the miss is reported (``beats_gd_lora``). The
chosen settings go into ``configs/vila/tiny.yaml`` (``per_method``) and ``bench/vila.py`` (``BASELINE``).
Writes JSON and a PNG.
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

from bench.vila import TINY, plain_lora_init, targets, versus
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


def _point(name: str, prep: Path, lr: float, rw: float, loss: str, extra: list[str]) -> dict[str, Any]:
    out = prep.parent / f"{loss}_lr{lr:g}_rw{rw:g}"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(prep / "init", out / "init")
    shutil.copytree(prep / "models" / "base", out / "models" / "base")
    method = "fila" if name == "fila" else "vila"  # the baseline only uses train + eval (no importance)
    args = [f"out={out}", f"method={method}", f"train.loss={loss}", f"train.lr={lr}", f"train.retain_weight={rw}", *extra]
    start = time.perf_counter()
    for stage in ("train", "eval"):
        if main(["vila", stage, str(TINY), *args]) != 0:
            raise SystemExit(f"{name} {args}: stage {stage} failed")
    summary = json.loads((out / "report.json").read_text())["summary"]
    shutil.rmtree(out / "models")  # 20 MB per point; the report is what the sweep keeps
    return {"lr": lr, "retain_weight": rw, "loss": loss, "summary": summary, "targets": targets(summary),
            "seconds": round(time.perf_counter() - start, 1)}


def _ok(p: dict[str, Any]) -> bool:
    return all(v is not False for v in p["targets"].values())


def best(points: list[dict[str, Any]], floor: float = 0.0) -> dict[str, Any] | None:
    """Targets met and utility >= floor; then the highest forget quality, then utility, then the smaller lr."""
    ok = [p for p in points if _ok(p) and p["summary"]["model_utility"][1] >= floor]
    key = lambda p: (p["summary"]["forget_quality"][1] or 0.0, p["summary"]["model_utility"][1], -p["lr"])  # noqa: E731
    return max(ok, key=key) if ok else None


def beats(p: dict[str, Any] | None, base: dict[str, Any] | None) -> bool:
    """The issue's comparison (bench/vila.py ``versus``): higher forget quality (ties: utility) at equal or
    better utility."""
    return p is not None and base is not None and all(versus(p["summary"], base["summary"]).values())


def choose(points: list[dict[str, Any]], base: dict[str, Any] | None) -> dict[str, Any] | None:
    """The selection rule. The baseline (base None): best(points). A Fisher method: its best point at the
    baseline's utility or above when that beats the baseline; else best(points), and the miss is reported."""
    if base is None:
        return best(points)
    matched = best(points, base["summary"]["model_utility"][1])
    return matched if beats(matched, base) else best(points)


def _plot(path: Path, doc: dict[str, Any]) -> None:
    """Forget quality against utility (the trade-off) and forget against retain accuracy (the targets); filled
    markers meet the three targets, the chosen point is circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for (name, m), color in zip(doc["methods"].items(), ("C0", "C1", "C2", "C3")):
        for p in m["points"]:
            s, ok = p["summary"], _ok(p)
            style = {"color": color, "marker": "o" if p["loss"] == LOSS[name] else "s",
                     "facecolors": color if ok else "none"}
            left.scatter(s["model_utility"][1], max(s["forget_quality"][1], 1e-6), **style)
            right.scatter(s["forget_accuracy_ratio"], s["retain_accuracy_ratio"], **style)
            label = f"{p['loss']} {p['lr']:g} rw{p['retain_weight']:g}"
            left.annotate(label, (s["model_utility"][1], max(s["forget_quality"][1], 1e-6)), fontsize=6)
        if m["chosen"]:
            c = m["chosen"]["summary"]
            left.scatter(c["model_utility"][1], c["forget_quality"][1], s=250, facecolors="none", edgecolors=color)
        left.scatter([], [], color=color, label=name)
    left.set(yscale="log", xlabel="model utility (after)", ylabel="forget quality (KS p, after)")
    left.legend()
    right.axvline(1 / 3, ls=":", color="gray")
    right.axhline(0.85, ls="--", color="gray")
    right.set(xlabel="forget acc / base (<= 1/3)", ylabel="retain acc / base (>= 0.85)")
    fig.suptitle("tiny world, 25 steps: per-method sweep (filled: the three targets met; circled: chosen)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save(out_json: Path, name: str, points: list[dict[str, Any]], command: str) -> dict[str, Any]:
    """Read, update this method's points, rechoose every method, write: sweeps of different methods can run
    side by side."""
    doc: dict[str, Any] = {"commands": [], "rule": choose.__doc__, "methods": {}}
    if out_json.is_file():
        doc.update({k: json.loads(out_json.read_text())[k] for k in ("commands", "methods")})
    if command not in doc["commands"]:
        doc["commands"].append(command)
    doc["methods"][name] = {"points": points}
    base = choose(doc["methods"]["gd_lora"]["points"], None) if "gd_lora" in doc["methods"] else None
    for method, m in doc["methods"].items():
        m["chosen"] = base if method == "gd_lora" else choose(m["points"], base)
        m["beats_gd_lora"] = None if method == "gd_lora" else beats(m["chosen"], base)
    out_json.write_text(json.dumps(doc, indent=1))
    return doc


def run(out_json: Path, methods: list[str], lrs: list[float], rws: list[float], loss: str | None,
        extra: list[str]) -> dict[str, Any]:
    """Every (lr, retain weight) not yet in ``out_json`` for each method; points already there are kept."""
    work, command = out_json.parent / "vila_sweep_runs", " ".join(["python", *sys.argv])
    old = json.loads(out_json.read_text())["methods"] if out_json.is_file() else {}
    doc: dict[str, Any] = {}
    for name in methods:
        m = {"points": list(old.get(name, {}).get("points", []))}
        done = {(p["lr"], p["retain_weight"], p["loss"]) for p in m["points"]}
        prep = _prepare(name, work)
        for rw in rws:
            for lr in lrs:
                if (lr, rw, loss or LOSS[name]) not in done:
                    m["points"].append(_point(name, prep, lr, rw, loss or LOSS[name], extra))
                    doc = _save(out_json, name, m["points"], command)
        doc = _save(out_json, name, m["points"], command)
    _plot(out_json.with_suffix(".png"), doc)
    return doc


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/vila_sweep.json"))
    p.add_argument("--methods", default="gd_lora,fila,vila")
    p.add_argument("--lrs", default="1e-5,2e-5,5e-5,1e-4,2e-4,5e-4,1e-3")
    p.add_argument("--retain-weights", default="1,2")
    p.add_argument("--loss", choices=["gd", "ihl", "npo"], help="instead of the method's own (LOSS)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    doc = run(a.out, a.methods.split(","), floats(a.lrs), floats(a.retain_weights), a.loss, a.overrides)
    print(json.dumps({k: m["chosen"] for k, m in doc["methods"].items()}, indent=1))
