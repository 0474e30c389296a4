"""``fisherdist lqlora allocate COSTS.json --budget BITS --out PLAN.json`` and
``fisherdist lqlora decompose MODEL --out DIR (--grid NAME | --plan PLAN.json | --qconfig NAME)``."""

from __future__ import annotations

import argparse
import json
import sys


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


def _decompose(args: argparse.Namespace) -> int:
    from fisherdist.methods.lqlora.stage import decompose_command

    return decompose_command(args)


def _add_decompose(lq: argparse._SubParsersAction) -> None:
    d = lq.add_parser("decompose", help="cost table over a configuration grid, or Q + L1 L2 for a plan")
    d.add_argument("model", help="HF model directory (safetensors; each rank reads only its matrices)")
    d.add_argument("--out", required=True, help="output directory (costs.json, or index.json + part-*.safetensors)")
    what = d.add_mutually_exclusive_group(required=True)
    what.add_argument("--grid", help="write OUT/costs.json over a grid: small (8 configs) or full (432)")
    what.add_argument("--plan", help="PLAN.json from `lqlora allocate`: decompose each matrix with its config")
    what.add_argument("--qconfig", help="one configuration for every matrix, e.g. nf3 or nf4-8bit-fp32-64x256")
    d.add_argument("--fisher", help="Fisher summaries (safetensors, <name>.row/.col/.total); none: data-agnostic")
    d.add_argument("--rank", type=int, default=64, help="LoRA rank r (default 64; 8 on the tiny world)")
    d.add_argument("--iters", type=int, default=100, help="maximum alternations (stops when the error rises)")
    d.add_argument("--svd", choices=("randomized", "exact"), default="randomized")
    d.add_argument("--targets", default=r".*_proj\.weight$", help="regex over weight names (default: *_proj)")
    d.add_argument("--nproc", type=int, default=1, help="local processes (matrices are split between them)")
    d.set_defaults(func=_decompose)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lqlora", help="LQ-LoRA: decompose (W ~ Q + L1 L2, cost tables) and allocate (ILP)")
    lq = p.add_subparsers(dest="lqlora_command", required=True, metavar="STAGE")
    a = lq.add_parser("allocate", help="choose each matrix's quantization under a bits-per-parameter budget")
    a.add_argument("costs", help='COSTS.json: {"matrices": [{"name", "numel", "configs": [...]}]}')
    a.add_argument("--budget", type=float, required=True, help="average bits per parameter, e.g. 2.75")
    a.add_argument("--out", required=True, help="PLAN.json to write (atomically)")
    a.add_argument("--time-limit", type=float, default=60.0, help="solver seconds (default 60, as the paper)")
    a.set_defaults(func=_allocate)
    _add_decompose(lq)
