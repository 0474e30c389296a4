"""The body of ``fisherdist fisher``: load, wrap, shard the data, accumulate, checkpoint, summarise."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from fisherdist.data.batches import data_batches
from fisherdist.distributed.collectives import DTYPES
from fisherdist.distributed.env import DistEnv, init_distributed, teardown
from fisherdist.distributed.preempt import PreemptionHandler
from fisherdist.errors import ConfigError
from fisherdist.fisher.api import Accumulator
from fisherdist.fisher.checkpoint import load_fisher, save_fisher
from fisherdist.fisher.run import check_health, fisher_step, make_accumulator
from fisherdist.models.load import load_tokenizer
from fisherdist.models.sharded_load import load_wrapped

if TYPE_CHECKING:
    from fisherdist.fisher.cli import FisherRunConfig


def _summary(acc: Accumulator, seconds: float) -> dict[str, Any]:
    """Per-parameter norms and maxima of the mean Fisher, computed shard-locally and reduced as scalars."""
    counts = acc.state.global_counts()
    rows = {}
    for fqn in acc.placement.shapes:
        f = acc.fisher(fqn, counts=counts)
        v = torch.stack([f.double().pow(2).sum(), f.double().abs().max() if f.numel() else f.new_zeros((), dtype=torch.float64)])
        if dist.is_initialized():
            dist.all_reduce(v[:1])
            dist.all_reduce(v[1:], op=dist.ReduceOp.MAX)
        rows[fqn] = {"norm": float(v[0].sqrt()), "max": float(v[1])}
    local = acc.placement.local_numel()
    return {"counts": counts, "seconds": round(seconds, 2), "params": rows,
            "numel_total": acc.placement.total_numel(), "numel_local_rank0": local, "meta": acc.state.meta}


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Fisher summary (mean convention)")
    for col in ("parameter", "norm", "max"):
        table.add_column(col)
    for fqn, row in list(summary["params"].items())[:12]:
        table.add_row(fqn, f"{row['norm']:.3e}", f"{row['max']:.3e}")
    if len(summary["params"]) > 12:
        table.add_row(f"... {len(summary['params']) - 12} more", "", "")
    console = Console()
    console.print(table)
    c = summary["counts"]
    console.print(f"samples {int(c['samples'])}, tokens {int(c['tokens'])}, skipped {int(c['skipped'])}, "
                  f"{summary['seconds']} s; rank 0 holds {summary['numel_local_rank0']:,} of "
                  f"{summary['numel_total']:,} Fisher elements")


def _log_summaries(cfg: FisherRunConfig, acc: Accumulator, steps: int) -> None:
    """Trace and max per target group to OUT/metrics.jsonl (and TensorBoard / W&B); the command is a top-level
    entry point, so it may use the recipes' logger (the engine itself never does)."""
    if cfg.fisher.estimator == "kfac":
        return
    from fisherdist.metrics import MetricsLogger, fisher_scalars

    values = fisher_scalars(acc)
    logger = MetricsLogger(cfg.out, cfg.log, config={"fisher": cfg.fisher.model_dump()}, resume=True)
    logger.log(steps, values)
    logger.close()


def run_fisher(cfg: FisherRunConfig, config_text: str) -> int:
    """Returns the exit status: 0, or ``PREEMPTED_EXIT`` after a checkpoint on SIGUSR1 / SIGTERM."""
    env = init_distributed(require_group=cfg.dist.backend != "none", timeout_s=cfg.dist.timeout_s)
    try:
        return _run(cfg, config_text, env)
    finally:
        teardown()


def _run(cfg: FisherRunConfig, config_text: str, env: DistEnv) -> int:
    from fisherdist.fisher.cli import resume_state, state_settings

    if cfg.fisher.decay is not None:  # its resume position counts samples, which an EMA decays
        raise ConfigError(f"fisher.decay={cfg.fisher.decay}: an online (EMA) Fisher belongs in a training loop; "
                          "fisherdist fisher estimates a plain mean (remove fisher.decay)")
    torch.manual_seed(cfg.fisher.seed)
    out = Path(cfg.out)
    tokenizer = load_tokenizer(cfg.model.path)
    wrapped = load_wrapped(cfg.model.path, DTYPES[cfg.model.dtype], cfg.dist.backend, env.device, load=cfg.model.load,
                           seed=cfg.fisher.seed)
    acc = make_accumulator(wrapped, cfg.fisher)
    ckpt = out / "fisher"
    if resume_state(cfg):
        load_fisher(acc.state, ckpt)
    save = partial(save_fisher, acc.state, ckpt, state_settings(cfg))  # the manifest records what it means
    counts = acc.state.global_counts()
    consumed = int(counts["samples"] + counts["skipped"])  # resume position, independent of the world size
    d = cfg.data
    batches, total = data_batches(d.path, d.field, tokenizer, d.max_length, d.batch_size, env.rank, env.world_size,
                                  skip=consumed, num_samples=d.num_samples, shuffle=d.shuffle, seed=d.seed)
    from rich.progress import Progress

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.fisher.seed + env.rank)
    # SIGUSR1 (Slurm --signal) / SIGTERM: finish the micro-batch, checkpoint, exit 75 (requeued under
    # Slurm); the restart resumes from the counts, on any number of processes.
    step = 0
    with PreemptionHandler() as pre, Progress(disable=env.rank != 0, transient=True) as bar:
        task = bar.add_task(f"fisher ({cfg.fisher.estimator}, {cfg.fisher.granularity})", total=total)
        for step, batch in enumerate(batches, start=1):
            fisher_step(wrapped, acc, {k: v.to(env.device) for k, v in batch.items()}, generator)
            bar.advance(task)
            if pre.should_stop():
                save()
                acc.close()
                return pre.exit_code()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save()
    check_health(acc)
    save()
    _log_summaries(cfg, acc, step)
    summary = _summary(acc, time.perf_counter() - start)
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_text)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        _print_summary(summary)
    acc.close()
    return 0
