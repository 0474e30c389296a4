"""``fisherdist suv mine|prefs|fisher|train|eval|run CONFIG [key=value ...]`` and ``fisherdist demo --out DIR``
(SUV-TV's ``fisherdist merge`` lives in :mod:`fisherdist.models.merge`).

Each stage reads the previous stage's files from ``out`` (see :mod:`fisherdist.methods.suv.stages`), so a
cluster job can run them separately; ``run`` chains all of them in one process group. With
``dist.nproc > 1`` and no launcher, the command re-launches itself on that many local processes.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from fisherdist.commands import launch
from fisherdist.methods.suv.config import SuvConfig
from fisherdist.methods.suv.stages import STAGES
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


def register(sub: argparse._SubParsersAction) -> None:
    register_stages(sub, STAGES, SuvConfig, help="SUV copyright unlearning: mine, prefs, fisher, train, eval, or run all",
                    config_help="YAML recipe (see configs/suv/)", example="train.lam=0.5 dist.nproc=2")
    d = sub.add_parser("demo", help="SUV end to end on the shipped tiny world (2 processes, FSDP2, ~5 min on CPU)")
    d.add_argument("--out", required=True, help="output directory (report.json, report.png, models/)")
    d.add_argument("overrides", nargs="*", help="optional key=value overrides of configs/suv/tiny.yaml")
    d.set_defaults(func=_demo)
