"""AlignGuard-LoRA on the tiny world across lambda_T, data-order seeds and ablations: how robust bench/agl.py's
verdict is (one Fisher pass, then per setting the agl arm's 100 steps and its evaluation; plain LoRA once
per seed as the baseline of that seed).

    python bench/agl_sweep.py [--lambdas 2 3 4 5] [--seeds 0 1 2]     # -> bench/results/agl_sweep.{json,png}

Rows: (label, seed, unsafe refusal after, drift_eval accuracy after, drop vs that seed's LoRA, accuracy vs
LoRA). Ablations at the recipe's lambda_T, seed 0: ``residual=false`` (top-subspace curvature only) and
``lambda_t=0`` (no curvature term).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "agl" / "tiny.yaml"


def _arm(run: Path, arm: str, overrides: list[str]) -> dict[str, float]:
    """Train one arm into ``run`` (its Fisher already there) and evaluate it; the arm's after-metrics."""
    from fisherdist import cli

    args = [str(CONFIG), f"out={run}", f"train.arms=[{arm}]", *overrides]
    if cli.main(["agl", "train", *args]) or cli.main(["agl", "eval", *args]):
        raise SystemExit(f"agl sweep: {arm} {overrides} failed")
    report: dict[str, Any] = json.loads((run / "drift_report.json").read_text())
    return {k: float(v) for k, v in report["after"][arm].items()}


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["task_vs_lora"], r["drop_vs_lora"], label=f"{r['label']} s{r['seed']}")
    ax.axhline(0.5, ls="--", c="grey")
    ax.axvline(0.8, ls="--", c="grey")
    ax.set_xlabel("drift_eval accuracy / plain LoRA's")
    ax.set_ylabel("refusal drop / plain LoRA's")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    from fisherdist import cli

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe-lambda", type=float, default=3.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--run-dir", default=str(REPO / "runs" / "bench_agl_sweep"))
    args = ap.parse_args()
    run, start = Path(args.run_dir), time.time()
    shutil.rmtree(run, ignore_errors=True)
    if cli.main(["agl", "fisher", str(CONFIG), f"out={run}", "train.arms=[agl]"]):
        return 1
    settings = [(f"lambda_t={lam:g}", s, [f"train.weights.lambda_t={lam}"]) for s in args.seeds for lam in args.lambdas]
    settings += [("residual=false", 0, [f"train.weights.lambda_t={args.recipe_lambda}", "train.weights.residual=false"]),
                 ("lambda_t=0", 0, ["train.weights.lambda_t=0"])]
    lora = {s: _arm(run, "lora", [f"train.seed={s}"]) for s in args.seeds}
    before = json.loads((run / "drift_report.json").read_text())["before"]["unsafe_refusal"]
    rows = []
    for label, seed, over in settings:
        got, base = _arm(run, "agl", [f"train.seed={seed}", *over]), lora[seed]
        rows.append({"label": label, "seed": seed, **got,
                     "drop_vs_lora": (before - got["unsafe_refusal"]) / max(before - base["unsafe_refusal"], 1e-9),
                     "task_vs_lora": got["task_accuracy"] / max(base["task_accuracy"], 1e-9)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    (out / "agl_sweep.json").write_text(json.dumps({"seconds": round(time.time() - start, 1), "before_unsafe_refusal": before,
                                                    "lora": lora, "rows": rows}, indent=1))
    _plot(rows, out / "agl_sweep.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
