"""``fisherdist suv mine|prefs|fisher|train|eval|run CONFIG [key=value ...]``, ``fisherdist demo --out DIR``
and ``fisherdist merge MODEL... --base DIR --out DIR`` (SUV-TV).

Each stage reads the previous stage's files from ``out`` (see :mod:`fisherdist.methods.suv.recipe`), so a
cluster job can run them separately; ``run`` chains all of them in one process group. With
``dist.nproc > 1`` and no launcher, the command re-launches itself on that many local processes.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from fisherdist.commands import launch
from fisherdist.methods.suv.config import SuvConfig
from fisherdist.methods.suv.recipe import STAGES
from fisherdist.recipes.cli import register_stages, run_stages
from fisherdist.recipes.stages import ALL

TINY = Path(__file__).resolve().parents[3] / "configs" / "suv" / "tiny.yaml"


def demo_overrides(out: str, extra: list[str]) -> list[str]:
    """The demo is the tiny recipe on 2 local processes under FSDP2, writing into ``out``."""
    return [f"out={out}", "dist.backend=fsdp2", "dist.nproc=2", *extra]


def _demo(args: argparse.Namespace) -> int:
    from fisherdist.errors import FisherdistError

    if not TINY.is_file():
        raise FisherdistError(f"the demo recipe {TINY} is missing: install fisherdist from a checkout "
                              "(pip install -e .), or run `fisherdist suv run YOUR_RECIPE.yaml`")
    return launch(SuvConfig, TINY, demo_overrides(args.out, args.overrides), ["demo", "--out", args.out, *args.overrides],
                  partial(run_stages, STAGES, [ALL]))


def _merge(args: argparse.Namespace) -> int:
    from fisherdist.commands import check_writable
    from fisherdist.errors import FisherdistError
    from fisherdist.models.merge import merge_model_dirs

    check_writable(args.out, "--out")
    if args.weights is not None and len(args.weights) != len(args.models):
        raise FisherdistError(f"--weights: got {len(args.weights)} values for {len(args.models)} models")
    out = merge_model_dirs(args.base, args.models, args.out, args.weights)
    print(f"merged {len(args.models)} task vectors into {args.base} -> {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    register_stages(sub, STAGES, SuvConfig, help="SUV copyright unlearning: mine, prefs, fisher, train, eval, or run all",
                    config_help="YAML recipe (see configs/suv/)", example="train.lam=0.5 dist.nproc=2")
    d = sub.add_parser("demo", help="SUV end to end on the shipped tiny world (2 processes, FSDP2, ~5 min on CPU)")
    d.add_argument("--out", required=True, help="output directory (report.json, report.png, models/)")
    d.add_argument("overrides", nargs="*", help="optional key=value overrides of configs/suv/tiny.yaml")
    d.set_defaults(func=_demo)
    m = sub.add_parser("merge", help="SUV-TV: W = W0 + sum_m w_m (W_m - W0) on q,k,v,o of merged SUV models")
    m.add_argument("models", nargs="+", help="HF directories to merge, e.g. a Fisher-run and a projected-run models/unlearned")
    m.add_argument("--base", required=True, help="the original model directory W0")
    m.add_argument("--out", required=True, help="output HF directory")
    m.add_argument("--weights", type=float, nargs="+", help="one weight per model (default 1 each)")
    m.set_defaults(func=_merge)
