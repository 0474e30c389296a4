"""GaLore and Natural GaLore under FSDP2 against torch AdamW and against another revision's optimizer, in
ONE 2-rank gloo run with the steps interleaved (one step of each optimizer in turn, so load from other jobs
hits all alike): optimizer step time, normal and refresh steps, per rank.

    python bench/optimizers_fsdp2.py --before 04d1349 --out bench/results/optimizers_fsdp2.json

Same model, data and settings as ``bench/optimizers.py``'s 2-rank part (tiny-world Llama, ``fully_shard``
per decoder layer and root, rank 64, window 4 in bf16). ``--before REV`` takes ``fisherdist/optim`` from
git revision REV (``git archive``) as a package of its own, so both versions step in the same processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.optimizers import SETTINGS, build_model, lm_loss, make_optimizer, token_batches, wrap

REPO = Path(__file__).resolve().parents[1]
NAMES = ["adamw", "galore", "natural", "natural_randomized"]


def export_before(rev: str, into: Path) -> None:
    """REV's ``fisherdist/optim`` as the top-level package ``optim_before`` under ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "fisherdist/optim"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "fisherdist" / "optim").rename(into / "optim_before")
    for path in (into / "optim_before").glob("*.py"):
        path.write_text(path.read_text().replace("fisherdist.optim", "optim_before"))


def build(labels: list[str], before: str | None) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    old = None
    if before is not None:
        sys.path.insert(0, before)
        import optim_before as old  # type: ignore[import-not-found]
    runs = {}
    for label in labels:
        model = wrap(build_model(), "fsdp2")
        ours = old if label.endswith("_before") else None
        runs[label] = (model, make_optimizer(label.removesuffix("_before"), model, SETTINGS["rank"], ours))
    return runs


def ranked(rank: int, world: int, labels: list[str], steps: int, gap: int, before: str | None) -> dict[str, Any]:
    """This rank's wall and thread-CPU step times per optimizer (refresh every ``gap`` steps)."""
    torch.set_num_threads(1)
    SETTINGS["gap"] = gap
    batches = token_batches("general_train", steps, SETTINGS["batch"], SETTINGS["seq"])
    runs = build(labels, before)
    samples: dict[str, list[tuple[int, float, float]]] = {label: [] for label in labels}
    for i, ids in enumerate(batches):
        for label, (model, opt) in runs.items():
            lm_loss(model, ids.tensor_split(world)[rank]).backward()
            wall, cpu = time.perf_counter(), time.thread_time()
            opt.step()
            samples[label].append((i, time.perf_counter() - wall, time.thread_time() - cpu))
            opt.zero_grad(set_to_none=True)
    out = {}
    for label, rows in samples.items():
        normal = [(w, c) for i, w, c in rows if i % gap != 0]
        refresh = [(w, c) for i, w, c in rows if i % gap == 0 and i > 0]
        out[label] = {"normal_wall_s": statistics.median(w for w, _ in normal),
                      "normal_cpu_s": statistics.median(c for _, c in normal),
                      "refresh_wall_s": statistics.median(w for w, _ in refresh),
                      "refresh_cpu_s": statistics.median(c for _, c in refresh)}
    return out


def ratios(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each optimizer's normal-step wall time over AdamW's, GaLore's and (if timed) its own before-version's."""
    def wall(label: str) -> float:
        return times[label]["normal_wall_s"]

    out = {}
    for label in times:
        row = {"x_adamw": wall(label) / wall("adamw"), "x_galore": wall(label) / wall("galore")}
        if label + "_before" in times:
            row["x_before"] = wall(label) / wall(label + "_before")
            row["refresh_x_before"] = times[label]["refresh_wall_s"] / times[label + "_before"]["refresh_wall_s"]
        out[label] = {k: round(v, 3) for k, v in row.items()}
    return out


def main() -> None:
    from tests.distributed import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/optimizers_fsdp2.json")
    parser.add_argument("--before", help="git revision whose fisherdist/optim to time alongside (optional)")
    parser.add_argument("--steps", type=int, default=31)
    parser.add_argument("--gap", type=int, default=10, help="update_proj_gap (refresh steps: every gap-th)")
    args = parser.parse_args()
    labels = NAMES + ([f"{n}_before" for n in NAMES if n != "adamw"] if args.before else [])
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            export_before(args.before, Path(tmp))
        ranks = run_distributed(ranked, 2, labels, args.steps, args.gap, tmp if args.before else None,
                                timeout=3000)
    report = {"settings": {**SETTINGS, "gap": args.gap}, "steps": args.steps, "before": args.before,
              "machine": "2-core CPU, 1 thread per process, gloo", "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                            time.gmtime()),
              "ranks": ranks, "ratios_rank0": ratios(ranks[0]), "ratios_rank1": ratios(ranks[1])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({"rank0": ranks[0], "ratios_rank0": report["ratios_rank0"]}, indent=1))


if __name__ == "__main__":
    main()
