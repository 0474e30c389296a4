"""Distributed decomposition: each rank reads only its own matrices (and their Fisher summaries) and
either scores them over a configuration grid (the cost table, gathered on rank 0 into ``costs.json``) or
decomposes them with their planned configuration, writing ``part-<rank>.safetensors`` keyed by matrix name
plus, on rank 0, ``index.json`` (matrix -> file, shape, config, error)."""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from fisherdist.atomic import write_text
from fisherdist.distributed.collectives import barrier, is_main, rank_world, world_size
from fisherdist.errors import ConfigError
from fisherdist.methods.lqlora.decompose import LQResult, lq_decompose
from fisherdist.methods.lqlora.fisher_weights import FisherWeights, fisher_loader
from fisherdist.methods.lqlora.placement import Target, find_targets, mine
from fisherdist.models.quant import QConfig


@dataclass(frozen=True)
class Options:
    """How every matrix is decomposed (the same on every rank)."""

    rank: int = 64
    iters: int = 100
    svd: str = "randomized"
    fisher: str | None = None


def read_mine(targets: Sequence[Target], opts: Options) -> Iterator[tuple[Target, torch.Tensor, FisherWeights | None]]:
    """This rank's matrices, each read alone from its file, with its Fisher (elementwise or summaries) if any."""
    fisher = fisher_loader(opts.fisher, [t.name for t in targets]) if opts.fisher else None
    for t in targets:
        with safe_open(str(t.file), framework="pt") as f:
            w = f.get_tensor(t.name).to(torch.float32)
        yield t, w, fisher(t.name) if fisher is not None else None


def _decompose(t: Target, w: torch.Tensor, cfg: QConfig, opts: Options, f: FisherWeights | None) -> LQResult:
    """Seeded by the matrix name, so a matrix gives the same result on whichever rank decomposes it."""
    return lq_decompose(w, cfg, opts.rank, opts.iters, f, opts.svd, seed=zlib.crc32(t.name.encode()))


def _gather(rows: list[Any]) -> list[Any]:
    """Every rank's rows on rank 0 (the others get an empty list)."""
    if world_size() == 1:
        return rows
    parts: list[Any] = [None] * world_size() if is_main() else []
    dist.gather_object(rows, parts if is_main() else None, dst=0)
    return [row for part in parts for row in part] if is_main() else []


def cost_table(model_dir: str | Path, configs: Sequence[QConfig], opts: Options, pattern: str) -> dict[str, Any]:
    """COSTS.json content (on rank 0; others return an empty table): the weighted squared error of an LQ
    decomposition of every matrix under every configuration."""
    targets = find_targets(model_dir, pattern)
    rows = []
    for t, w, f in read_mine(mine(targets, *rank_world()), opts):
        cfgs = [{"name": c.name, "bits_per_param": c.bits_per_param(), "error": _decompose(t, w, c, opts, f).error}
                for c in configs]
        rows.append({"name": t.name, "numel": t.numel, "configs": cfgs})
    order = {t.name: i for i, t in enumerate(targets)}
    return {"matrices": sorted(_gather(rows), key=lambda r: order[r["name"]])}


def decompose_plan(model_dir: str | Path, out: str | Path, assignment: dict[str, str], opts: Options,
                   pattern: str) -> Path:
    """Write this rank's Q (packed) + L1 + L2 by matrix name; rank 0 writes the index after a barrier."""
    targets = find_targets(model_dir, pattern)
    missing = sorted({t.name for t in targets} - set(assignment))
    if missing:
        raise ConfigError(f"plan: no configuration for {missing[0]!r} ({len(missing)} matrices missing)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = rank_world()
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {}
    for t, w, f in read_mine(mine(targets, rank, world), opts):
        res = _decompose(t, w, QConfig.parse(assignment[t.name]), opts, f)
        tensors.update(res.q.to_tensors(f"{t.name}.q"))
        tensors.update({f"{t.name}.l1": res.l1.contiguous(), f"{t.name}.l2": res.l2.contiguous()})
        index[t.name] = {"file": f"part-{rank:05d}.safetensors", "shape": list(t.shape),
                         "config": res.q.config.name, "error": res.error, "iterations": len(res.errors)}
    part = out / f"part-{rank:05d}.safetensors"
    tmp = part.with_name(f".{part.name}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(part)
    merged = dict(sorted(kv for part_index in _gather([index]) for kv in part_index.items()))
    if is_main():
        write_text(out / "index.json", json.dumps({"rank": opts.rank, "matrices": merged}, indent=1) + "\n")
    barrier()
    return out


def _assignment(args: argparse.Namespace) -> dict[str, str] | None:
    """The per-matrix configuration from --plan or --qconfig (validated up front), None for --grid."""
    if args.qconfig:
        QConfig.parse(args.qconfig)
        return {t.name: args.qconfig for t in find_targets(args.model, args.targets)}
    if args.plan:
        try:
            plan = json.loads(Path(args.plan).read_text())["assignment"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{args.plan}: expected a PLAN.json with an 'assignment' object ({e!r})") from None
        for name in plan.values():
            QConfig.parse(name)
        return dict(plan)
    return None


def decompose_command(args: argparse.Namespace) -> int:
    from fisherdist.distributed.env import init_distributed, teardown
    from fisherdist.distributed.spawn import maybe_spawn
    from fisherdist.methods.lqlora.grid import grid

    try:
        configs = grid(args.grid) if args.grid else []
        assignment = _assignment(args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    argv = ["lqlora", "decompose", args.model, "--out", args.out, "--rank", str(args.rank), "--iters", str(args.iters),
            "--svd", args.svd, "--targets", args.targets,
            *(["--fisher", args.fisher] if args.fisher else []),
            *(["--grid", args.grid] if args.grid else ["--plan", args.plan] if args.plan else ["--qconfig", args.qconfig])]
    code = maybe_spawn(args.nproc, argv)
    if code is not None:
        return code
    init_distributed(require_group=False)
    opts = Options(args.rank, args.iters, args.svd, args.fisher)
    try:
        if assignment is None:
            table = cost_table(args.model, configs, opts, args.targets)
            if is_main():
                Path(args.out).mkdir(parents=True, exist_ok=True)
                write_text(Path(args.out) / "costs.json", json.dumps(table, indent=1) + "\n")
        else:
            decompose_plan(args.model, args.out, assignment, opts, args.targets)
        if is_main():
            print(f"lqlora decompose -> {args.out}")
    finally:
        teardown()
    return 0
