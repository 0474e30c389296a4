"""``fisherdist suv mine|prefs|fisher|train|eval|run CONFIG [key=value ...]`` and ``fisherdist demo --out DIR``.

Each stage reads the previous stage's files from ``out`` (see :mod:`fisherdist.methods.suv.recipe`), so a
cluster job can run them separately; ``run`` chains all of them in one process group. With
``dist.nproc > 1`` and no launcher, the command re-launches itself on that many local processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fisherdist.config import dump_config, load_config

STAGES = ("mine", "prefs", "fisher", "train", "eval", "run")
TINY = Path(__file__).resolve().parents[3] / "configs" / "suv" / "tiny.yaml"


def _stage(args: argparse.Namespace) -> int:
    from fisherdist.dist.spawn import maybe_spawn
    from fisherdist.methods.suv.config import SuvConfig

    cfg = load_config(SuvConfig, args.config, args.overrides)
    code = maybe_spawn(cfg.dist.nproc, ["suv", args.stage, args.config, *args.overrides])
    if code is not None:
        return code
    from fisherdist.methods.suv.recipe import run_stages

    run_stages(cfg, dump_config(cfg), [args.stage])
    return 0


def demo_overrides(out: str, extra: list[str]) -> list[str]:
    """The demo is the tiny recipe on 2 local processes under FSDP2, writing into ``out``."""
    return [f"out={out}", "dist.backend=fsdp2", "dist.nproc=2", *extra]


def _demo(args: argparse.Namespace) -> int:
    from fisherdist.dist.spawn import maybe_spawn
    from fisherdist.methods.suv.config import SuvConfig

    overrides = demo_overrides(args.out, args.overrides)
    cfg = load_config(SuvConfig, TINY, overrides)
    argv = ["demo", "--out", args.out, *args.overrides]
    code = maybe_spawn(cfg.dist.nproc, argv)
    if code is not None:
        return code
    from fisherdist.methods.suv.recipe import run_stages

    run_stages(cfg, dump_config(cfg), ["run"])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suv", help="SUV copyright unlearning: mine, prefs, fisher, train, eval, or run all")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("config", help="YAML recipe (see configs/suv/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lam=0.5 dist.nproc=2")
    p.set_defaults(func=_stage)
    d = sub.add_parser("demo", help="SUV end to end on the shipped tiny world (2 processes, FSDP2, ~5 min on CPU)")
    d.add_argument("--out", required=True, help="output directory (report.json, report.png, models/)")
    d.add_argument("overrides", nargs="*", help="optional key=value overrides of configs/suv/tiny.yaml")
    d.set_defaults(func=_demo)
