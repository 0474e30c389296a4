"""``fisherdist lqlora {fisher,decompose,train,export,run} CONFIG [key=value ...]`` (the recipe's stages),
``fisherdist lqlora allocate COSTS.json --budget BITS --out PLAN.json`` (the ILP alone) and
``fisherdist lqlora decompose MODEL --out DIR (--grid NAME | --plan PLAN.json | --qconfig NAME)`` (the
decomposition alone): ``decompose`` given a YAML file runs the stage, given a model directory the tool."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _allocate(args: argparse.Namespace) -> int:
    from fisherdist.atomic import write_text
    from fisherdist.methods.lqlora.allocate import load_costs, solve

    plan, optimal = solve(load_costs(args.costs), args.budget, args.time_limit)
    write_text(args.out, json.dumps(plan, indent=1) + "\n")
    if not optimal:
        print(f"warning: time limit {args.time_limit}s reached, plan not proven optimal", file=sys.stderr)
    print(f"{len(plan['assignment'])} matrices, {plan['bits_per_param']:.4f} bits/param, error "
          f"{plan['error']:.6g} -> {args.out}")
    return 0


def _is_config(path: str) -> bool:
    return path.endswith((".yaml", ".yml")) and Path(path).is_file()


def _decompose(args: argparse.Namespace) -> int:
    if _is_config(args.model):
        return _run_stage("decompose", args.model, args.overrides)
    if args.overrides or not args.out or not (args.grid or args.plan or args.qconfig):
        args.parser.error("decompose MODEL needs --out and one of --grid/--plan/--qconfig (no key=value overrides)")
    from fisherdist.methods.lqlora.stage import decompose_command

    return decompose_command(args)


def _run_stage(name: str, config: str, overrides: list[str]) -> int:
    from fisherdist.commands import launch
    from fisherdist.methods.lqlora.config import LqloraConfig
    from fisherdist.methods.lqlora.recipe import STAGES
    from fisherdist.recipes.cli import run_stages
    from fisherdist.recipes.stages import ALL

    names = [ALL] if name == ALL else [name]
    return launch(LqloraConfig, config, overrides, ["lqlora", name, config, *overrides],
                  lambda cfg, text: run_stages(STAGES, names, cfg, text))


def _add_stage(lq: argparse._SubParsersAction, name: str, help: str) -> None:
    p = lq.add_parser(name, help=help)
    p.add_argument("config", help="YAML config (see configs/lqlora/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. decompose.budget=2.75 dist.nproc=2")
    p.set_defaults(func=lambda args: _run_stage(name, args.config, args.overrides))


def _add_decompose(lq: argparse._SubParsersAction) -> None:
    d = lq.add_parser("decompose", help="stage: cost tables + ILP + Q, L1, L2 (CONFIG); or the tool on MODEL")
    d.add_argument("model", help="YAML config (the recipe stage), or a HF model directory (the tool)")
    d.add_argument("overrides", nargs="*", help="with a config: dotted key=value overrides")
    d.add_argument("--out", help="output directory (costs.json, or index.json + part-*.safetensors)")
    what = d.add_mutually_exclusive_group()
    what.add_argument("--grid", help="write OUT/costs.json over a grid: small (8 configs) or full (432)")
    what.add_argument("--plan", help="PLAN.json from `lqlora allocate`: decompose each matrix with its config")
    what.add_argument("--qconfig", help="one configuration for every matrix, e.g. nf3 or nf4-8bit-fp32-64x256")
    d.add_argument("--fisher", help="Fisher summaries (safetensors, <name>.row/.col/.total); none: data-agnostic")
    d.add_argument("--rank", type=int, default=64, help="LoRA rank r (default 64; 8 on the tiny world)")
    d.add_argument("--iters", type=int, default=100, help="maximum alternations (stops when the error rises)")
    d.add_argument("--svd", choices=("randomized", "exact"), default="randomized")
    d.add_argument("--targets", default=r".*_proj\.weight$", help="regex over weight names (default: *_proj)")
    d.add_argument("--nproc", type=int, default=1, help="local processes (matrices are split between them)")
    d.set_defaults(func=_decompose, parser=d)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lqlora", help="LQ-LoRA: Fisher, decomposition W ~ Q + L1 L2, ILP bits, fine-tuning")
    lq = p.add_subparsers(dest="lqlora_command", required=True, metavar="STAGE")
    _add_stage(lq, "fisher", "stage: calibration Fisher per matrix, on the rank that decomposes it")
    _add_stage(lq, "train", "stage: fine-tune L1 L2 with Q frozen and packed -> models/lqlora")
    _add_stage(lq, "export", "stage: models/merged (dense Q + s B A) and report.json (measured bits)")
    _add_stage(lq, "run", "every stage in order: fisher, decompose, train, export")
    a = lq.add_parser("allocate", help="choose each matrix's quantization under a bits-per-parameter budget")
    a.add_argument("costs", help='COSTS.json: {"matrices": [{"name", "numel", "configs": [...]}]}')
    a.add_argument("--budget", type=float, required=True, help="average bits per parameter, e.g. 2.75")
    a.add_argument("--out", required=True, help="PLAN.json to write (atomically)")
    a.add_argument("--time-limit", type=float, default=60.0, help="solver seconds (default 60, as the paper)")
    a.set_defaults(func=_allocate)
    _add_decompose(lq)
