"""``fisherdist plan``: per-rank memory of a model x world x backend x method, before queueing the job."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from typing import Any

from fisherdist.errors import ConfigError
from fisherdist.fisher.comm import DEFAULT_BUCKET_MB
from fisherdist.plan.layout import BACKENDS
from fisherdist.plan.methods import AGL_BACKENDS

DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "fp32": 4, "float32": 4, "float": 4,
               "fp64": 8, "float64": 8}
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
GENERAL = [
    "activations: checkpointing per decoder layer (inputs kept, one layer recomputed), SDPA attention",
    "optimizer: FSDP/DDP use torch AdamW (moments in the parameter dtype, no master copy); DeepSpeed ZeRO keeps "
    "its own fp32 master partition (also for fp32 models) and fp32 moments",
    "per rank = the most loaded rank; total = persistent + the largest transient step buffers",
]


def parse_bytes(text: str) -> int:
    """``80GiB``, ``141 GB``, ``85899345920``: a memory size in bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise ConfigError(f"--gpu-memory: cannot parse {text!r}; expected a size like 80GiB, 141GB or 85899345920")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def _check(args: argparse.Namespace) -> None:
    if args.backend not in BACKENDS:
        raise ConfigError(f"--backend: unknown backend {args.backend!r}; expected one of {', '.join(BACKENDS)}")
    if args.dtype.lower() not in DTYPE_BYTES:
        raise ConfigError(f"--dtype: unknown dtype {args.dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
    for key in ("nodes", "gpus_per_node", "micro_batch", "seq"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}: {getattr(args, key)} must be at least 1")
    if args.method == "ngalore" and args.backend.startswith("zero"):
        raise ConfigError(f"--backend {args.backend}: Natural GaLore projects whole 2-D matrices and DeepSpeed ZeRO's "
                          "flat partitions cut across them (fisherdist.optim refuses it); plan it on fsdp2 or ddp")
    if args.method == "agl" and args.backend not in AGL_BACKENDS:
        raise ConfigError(f"--backend {args.backend}: AlignGuard-LoRA's penalties need per-module LoRA rows, which "
                          f"FSDP1's flat parameters do not have (fisherdist agl refuses it); plan it on one of "
                          f"{', '.join(AGL_BACKENDS)}")
    for key in ("quant_bits", "subspace"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ConfigError(f"--{key.replace('_', '-')}: {getattr(args, key)} must be positive")


def compute(args: argparse.Namespace) -> dict[str, Any]:
    """The plan as the JSON document ``--json`` prints (inputs are checked before the model is built)."""
    from fisherdist.plan.memory import Job, plan
    from fisherdist.plan.methods import method_model
    from fisherdist.plan.model import load_model

    _check(args)
    gpu = parse_bytes(args.gpu_memory)
    model = load_model(args.model)
    world = args.nodes * args.gpus_per_node
    bucket = int(args.bucket_mb * 2**20)
    job = Job(model, args.backend, world, DTYPE_BYTES[args.dtype.lower()], args.micro_batch, args.seq, bucket)
    mm = method_model(args.method, model, args.params.split(","), args.granularity, args.lora_r, args.quant_bits,
                      args.subspace)
    if args.optimizer:
        mm = replace(mm, optimizer=args.optimizer)
    result = plan(job, mm)
    return {
        "model": model.name, "parameters_total": model.numel(), "method": args.method, "backend": args.backend,
        "world_size": world, "dtype": args.dtype, "granularity": mm.granularity, "optimizer": mm.optimizer,
        "per_rank_bytes": result.per_rank, "transient_bytes": result.transient, "rank": result.rank,
        "gpu_bytes": gpu, "fits": result.per_rank["total"] <= gpu, "assumptions": result.assumptions + GENERAL,
    }


def _print_table(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    gib = 2**30
    table = Table(title=f"{doc['model']} / {doc['method']} / {doc['backend']} x {doc['world_size']} ranks "
                        f"({doc['dtype']}, rank {doc['rank']})")
    table.add_column("component")
    table.add_column("GiB per rank", justify="right")
    for key, value in doc["per_rank_bytes"].items():
        if key != "total":
            table.add_row(key, f"{value / gib:.2f}")
    for key, value in doc["transient_bytes"].items():
        if key not in ("total", "activations"):
            table.add_row(f"  transient: {key}", f"{value / gib:.2f}")
    verdict = "fits" if doc["fits"] else "DOES NOT FIT"
    table.add_row("total", f"{doc['per_rank_bytes']['total'] / gib:.2f} of {doc['gpu_bytes'] / gib:.1f}: {verdict}")
    console = Console()
    console.print(table)
    for line in doc["assumptions"]:
        console.print(f"- {line}", markup=False)


def _run(args: argparse.Namespace) -> int:
    doc = compute(args)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        _print_table(doc)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fisherdist.plan.methods import METHODS

    p.add_argument("--model", required=True, help="a shipped name (llama-2-7b, ...), a config.json or a model dir")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--backend", default="fsdp2", help=f"one of {', '.join(BACKENDS)}")
    p.add_argument("--method", default="fisher", choices=METHODS)
    p.add_argument("--granularity", default="sample", choices=("sample", "microbatch", "batch"))
    p.add_argument("--params", default="*", help="comma-separated fnmatch patterns of Fisher targets (method fisher)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences (SUV: preference pairs) per rank per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bf16", help="parameter dtype: bf16, bfloat16, fp16, float32, ...")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (Natural GaLore: projection rank)")
    p.add_argument("--quant-bits", type=float, default=None,
                   help="lqlora: average bits per packed element (default: LQ-LoRA's decompose.budget, 3.5)")
    p.add_argument("--subspace", type=int, default=None, help="agl: m, eigenvectors per module (default 16)")
    p.add_argument("--optimizer", default=None, choices=("adamw", "sgd", "none"),
                   help="override the method's optimizer (fisher: none; LoRA methods: adamw)")
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB,
                   help="ZeRO: statistics streamed to their owners through buckets of this many MiB "
                        "(the engine's fisher.bucket_mb)")
    p.add_argument("--gpu-memory", default="80GiB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("plan", help="per-rank GPU memory of a run, computed from the model config")
    add_arguments(p)
    p.set_defaults(func=_run)
