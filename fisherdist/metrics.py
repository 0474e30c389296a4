"""Per-step scalars to ``OUT/metrics.jsonl``, and to TensorBoard and Weights & Biases when asked.

    log:
      tensorboard: true             # OUT/tensorboard/ event files
      wandb: {project: my-project}  # offline by default (OUT/wandb/offline-run-*), mode: online to sync

One JSON object per step, ``{"step": N, "time": unix seconds, "stage": NAME, <name>: value, ...}``. Only rank 0
writes; callers pass values that are already global (reduced over ranks), so every sink shows the run, not a rank.
One run (all stages of a command) shares one logger; ``stage`` tells apart trainers whose steps restart at 1
(e.g. AGL's arms): TensorBoard and W&B tags are ``STAGE/NAME``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from fisherdist.config import Section
from fisherdist.distributed.collectives import is_main


class WandbSettings(Section):
    project: str = Field(description="W&B project name")
    name: str | None = Field(None, description="run name (default: W&B's)")
    mode: Literal["offline", "online"] = Field("offline", description="offline needs no network; `wandb sync` later")


class LogSettings(Section):
    """The ``log:`` section: where per-step scalars go besides ``OUT/metrics.jsonl``."""

    tensorboard: bool = False
    wandb: WandbSettings | None = None


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a log row (lists, strings and the step itself are not scalars)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step" and math.isfinite(value):
            out[key] = float(value)
    return out


class MetricsLogger:
    """Rank 0's sinks for one run; ``resume`` appends to an existing ``metrics.jsonl``."""

    def __init__(self, out: str | Path, settings: LogSettings | None = None, *, config: dict[str, Any] | None = None,
                 resume: bool = False) -> None:
        self.out, self.settings = Path(out), settings or LogSettings()
        self.enabled = is_main()
        self._last: dict[str | None, float] = {}
        self._tb: Any = None
        self._wandb: Any = None
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = (self.out / "metrics.jsonl").open("a" if resume else "w", encoding="utf-8")
        if self.settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out / "tensorboard"))
        if self.settings.wandb is not None:
            self._wandb = _wandb_run(self.settings.wandb, self.out, config or {})

    def log(self, step: int, values: Mapping[str, Any], stage: str | None = None) -> None:
        """Write one step's scalars (non-scalars in ``values`` are ignored)."""
        if not self.enabled:
            return
        row = scalars(values)
        head: dict[str, Any] = {"step": int(step), "time": time.time(), **({"stage": stage} if stage else {})}
        self._file.write(json.dumps({**head, **row}) + "\n")
        self._file.flush()
        tagged = {(f"{stage.replace(' ', '_')}/{k}" if stage else k): v for k, v in row.items()}
        for key, value in tagged.items():
            if self._tb is not None:
                self._tb.add_scalar(key, value, global_step=int(step))
        if self._wandb is not None:  # W&B's own step must grow, and stages restart at 1: the step is a value
            self._wandb.log({**tagged, f"{stage.replace(' ', '_')}/step": step} if stage else tagged,
                            **({} if stage else {"step": int(step)}))

    def log_step(self, step: int, row: Mapping[str, Any], optimizer: torch.optim.Optimizer | None = None,
                 samples: int | None = None, tokens: float | None = None, stage: str | None = None) -> None:
        """A training step's row plus the learning rate and the throughput since the previous call of the
        same stage (the first step of a stage has none)."""
        extra: dict[str, float] = {"samples": samples} if samples is not None else {}
        extra.update({"tokens": tokens} if tokens is not None else {})
        if optimizer is not None and optimizer.param_groups:
            extra["lr"] = float(optimizer.param_groups[0]["lr"])
        now = time.perf_counter()
        last = self._last.get(stage)
        if last is not None and now > last:
            seconds = now - last
            extra.update({"samples_per_s": samples / seconds} if samples is not None else {})
            extra.update({"tokens_per_s": tokens / seconds} if tokens is not None else {})
        self._last[stage] = now
        self.log(step, {**row, **extra}, stage)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(settings: WandbSettings, out: Path, config: dict[str, Any]) -> Any:
    import wandb

    return wandb.init(project=settings.project, name=settings.name, mode=settings.mode, dir=str(out), config=config,
                      reinit="finish_previous")


def target_group(fqn: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight`` (one group per role)."""
    return ".".join("*" if part.isdigit() else part for part in fqn.split("."))


def fisher_scalars(acc: Any, state: str = "default") -> dict[str, float]:
    """Trace and max of the mean-convention diagonal Fisher, overall and per target group, from each rank's
    fragments (two small all-reduces; no tensor is gathered). Collective."""
    import torch.distributed as dist

    counts = acc.state.global_counts() if state == "default" else acc.states[state].global_counts()
    groups = sorted({target_group(f) for f in acc.targets})
    sums = torch.zeros(len(groups), dtype=torch.float64)
    maxes = torch.full((len(groups),), -math.inf, dtype=torch.float64)
    for fqn in acc.targets:
        values = acc.fisher(fqn, counts=counts, state=state).to(torch.float64).cpu()
        if values.numel():
            k = groups.index(target_group(fqn))
            sums[k] += values.sum()
            maxes[k] = torch.maximum(maxes[k], values.max())
    if dist.is_initialized() and acc.placement.world > 1:
        dist.all_reduce(sums, group=acc.backend.group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=acc.backend.group)
    out = {"fisher/trace": float(sums.sum()), "fisher/samples": counts["samples"], "fisher/tokens": counts["tokens"]}
    for g, s, m in zip(groups, sums.tolist(), maxes.tolist()):
        out[f"fisher/{g}/trace"], out[f"fisher/{g}/max"] = s, m
    return out
