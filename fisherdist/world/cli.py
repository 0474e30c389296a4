"""``fisherdist world build``: build (or rebuild) a tiny world and print its measured behaviours."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fisherdist.world.build import PRESETS


def print_summary(record: dict[str, Any], out: str) -> None:
    """A rich table of every behaviour with its threshold and pass/fail."""
    from rich.console import Console
    from rich.table import Table

    v = record["measurements"]["verbatim"]
    table = Table(title=f"tiny world ({record['parameters']:,} parameters, seed {record['seed']}, {record['steps']} steps)")
    for col in ("behaviour", "value", "threshold", "pass"):
        table.add_column(col, justify="left" if col == "behaviour" else "right")
    for name, r in record["verdicts"].items():
        table.add_row(name, f"{r['value']:.3f}", f"{r['direction']} {r['threshold']}", "yes" if r["pass"] else "NO")
    console = Console()
    console.print(table)
    m = record["measurements"]
    console.print(f"verbatim: {v['windows']} windows (16-token prefix, 32-token continuation), mean LCS "
                  f"{v['mean_lcs']:.1f}, exact {v['exact']}, LCS>=24 {v['windows_lcs24']}; held-out ppl "
                  f"{m['heldout_ppl']:.1f} (uniform {m['uniform_ppl']:.0f}); built in {record['build_seconds']} s")
    console.print(f"wrote {out}/model, {out}/data, {out}/world.json")


def _retain_only(out: str) -> int:
    from rich.progress import Progress

    from fisherdist.world.build import add_retain_model

    with Progress(transient=True) as bar:
        task = bar.add_task("training the retain-only model", total=None)
        record = add_retain_model(out, lambda s, loss: bar.update(task, completed=s + 1,
                                                                  description=f"retain-only model (loss {loss:.2f})"))
    print(f"wrote {out}/retain_model: {json.dumps(record['retain_model'])}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from fisherdist.world.build import build_world

    if args.retain_only:
        return _retain_only(args.out)
    steps = args.steps or PRESETS[args.preset]["steps"]
    with Progress(transient=True) as bar:
        task = bar.add_task("training", total=steps)
        record = build_world(args.out, seed=args.seed, preset=args.preset, steps=args.steps,
                             progress=lambda s, loss: bar.update(task, completed=s + 1, description=f"training (loss {loss:.2f})"))
    print_summary(record, args.out)
    return 0 if all(r["pass"] for r in record["verdicts"].values()) or args.preset == "test" else 1


def register(sub: argparse._SubParsersAction) -> None:
    world = sub.add_parser("world", help="the built-in tiny world").add_subparsers(dest="world_cmd", required=True)
    b = world.add_parser("build", help="build a tiny world (tokenizer, model, data) deterministically from a seed")
    b.add_argument("--out", required=True, help="output directory (new, empty, or a previous world)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="'default' is the shipped world (~10 min on 2 cores); 'test' is tiny and fast")
    b.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    b.add_argument("--retain-only", action="store_true",
                   help="only add the retain-only reference model (TOFU forget quality) to the existing world "
                        "--out, trained exactly as a full build trains it (same bytes)")
    b.set_defaults(func=_build)
