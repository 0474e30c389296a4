"""The training loop every method shares: global batches, hooks, LR schedule, clipping, checkpoints, preemption.

One optimizer step (:meth:`Trainer.step`) reads as its phases::

    hooks.before_loss -> loss + hooks.extra_loss -> backward -> hooks.extra_grads (full-size, added through
    the wrapped model) -> hooks.after_backward -> clip -> lr -> optimizer step -> hooks.after_step (metrics)

Data: step ``s`` (0-based, over all epochs) consumes the records ``[j*G, (j+1)*G)`` of epoch ``e``'s seeded
permutation (``e, j = divmod(s, steps_per_epoch)``), ``G`` the global batch; rank ``r`` takes slots
``[r*ceil(G/W), (r+1)*ceil(G/W))`` of them, empty slots are ``-1`` (a ragged last step, or a world size that
does not divide ``G``). The position is therefore one integer, valid on any world size.

Checkpoints (:class:`~fisherdist.distributed.checkpoint.RunCheckpointer`): the trainable weights and the
optimizer state (FQN keys, see :meth:`Wrapped.trainable_state_dict`), each hook's state, and in ``run.json``
the step, the global batch, the settings' hash and the per-step log with the records each step consumed.
SIGUSR1 / SIGTERM finish the step, checkpoint and raise :class:`TrainingPreempted` (exit status 75, the job
requeued under Slurm); the same command then resumes on any world size and backend.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fisherdist.distributed.checkpoint import RunCheckpointer, config_hash
from fisherdist.distributed.collectives import all_reduce_sum, barrier, is_main, rank_world
from fisherdist.distributed.preempt import PREEMPTED_EXIT, PreemptionHandler
from fisherdist.distributed.wrap import Wrapped
from fisherdist.errors import ConfigError
from fisherdist.metrics import MetricsLogger
from fisherdist.recipes.step_metrics import TokenCounter
from fisherdist.recipes.train_config import OptimSettings
from fisherdist.recipes.train_state import HookStates, TrainableState

CHECKPOINT_KEYS = {"checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "resume", "batch_size", "log_every"}
"""Settings that may change between a run and its resume (the global batch is taken from the checkpoint)."""


class TrainingPreempted(SystemExit):
    """Raised after the preemption checkpoint: the process exits 75 ("run the same command again")."""

    def __init__(self, step: int, code: int = PREEMPTED_EXIT) -> None:
        super().__init__(code)
        self.step = step


@dataclass(frozen=True)
class StepBatch:
    """One optimizer step's data: the global records (in order) and this rank's slots (``-1`` = empty)."""

    step: int  # 1-based over the whole run
    records: list[int]
    mine: list[int]
    world: int

    @property
    def n_real(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class DataPlan:
    """Which records every step consumes: a function of (records, global batch, epochs, seed) only."""

    records: int
    global_batch: int
    epochs: int
    seed: int
    max_steps: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.records / self.global_batch)

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def steps(self, start: int, rank: int, world: int) -> Iterator[StepBatch]:
        """Steps ``start+1 .. total`` for this rank (the permutations of skipped epochs are still drawn)."""
        g = torch.Generator().manual_seed(self.seed)
        per_rank = math.ceil(self.global_batch / world)
        for epoch in range(self.epochs):
            order = torch.randperm(self.records, generator=g).tolist()
            for j in range(self.steps_per_epoch):
                step = epoch * self.steps_per_epoch + j + 1
                if step > self.total_steps:
                    return
                if step <= start:
                    continue
                glob = order[j * self.global_batch : (j + 1) * self.global_batch]
                mine = [glob[i] if i < len(glob) else -1 for i in range(rank * per_rank, (rank + 1) * per_rank)]
                yield StepBatch(step, glob, mine, world)


class TrainHook:
    """Extension points of one step (all optional); a hook with state also implements ``state_dict`` /
    ``load_state_dict`` (DCP ``Stateful``) and is checkpointed under its ``name``."""

    name = "hook"

    def before_loss(self, batch: StepBatch) -> None:
        """Work before the main forward (e.g. a retain-gradient pass feeding a projection)."""

    def extra_loss(self, batch: StepBatch) -> torch.Tensor | None:
        """A term added to the loss before ``backward`` (e.g. a regulariser of live parameters)."""
        return None

    def extra_grads(self, batch: StepBatch) -> dict[torch.Tensor, torch.Tensor]:
        """Full-size gradients added after ``backward`` (terms computed outside the forward, e.g. ZeRO-3)."""
        return {}

    def after_backward(self, batch: StepBatch) -> None:
        """Work on the reduced gradients before clipping (accumulators, gradient projection)."""

    def after_step(self, batch: StepBatch, row: dict[str, Any]) -> None:
        """After the optimizer step: add this step's metrics to ``row``, update schedules."""


def lr_factor(settings: OptimSettings, step: int, total: int) -> float:
    """Multiplier of the base lr at 1-based ``step``: linear warmup, then constant / linear / cosine to 0."""
    warm = settings.warmup_steps
    if step <= warm:
        return step / (warm + 1)
    if settings.lr_schedule == "constant":
        return 1.0
    frac = (step - warm) / max(1, total - warm)
    return 1.0 - frac if settings.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


LossFn = Callable[[StepBatch], torch.Tensor]


class Trainer:
    """One training run of ``loss`` over ``num_records`` records with ``hooks`` (see the module docstring)."""

    def __init__(self, wrapped: Wrapped, num_records: int, settings: OptimSettings, loss: LossFn, *,
                 hooks: Sequence[TrainHook] = (), checkpoint_dir: str | Path | None = None, name: str = "train",
                 fingerprint: str = "", metrics: MetricsLogger | None = None) -> None:
        if num_records <= 0:
            raise ConfigError(f"{name}: no training records")
        self.w, self.cfg, self.loss, self.hooks, self.name = wrapped, settings, loss, list(hooks), name
        self.rank, self.world = rank_world()
        self.plan = DataPlan(num_records, settings.batch_size * self.world, settings.epochs, settings.seed,
                             settings.max_steps)
        self.ckpt = RunCheckpointer(checkpoint_dir, settings.keep_checkpoints) if checkpoint_dir is not None else None
        self.fingerprint = config_hash(settings.model_dump_json(exclude=CHECKPOINT_KEYS) + f"|{num_records}|{fingerprint}")
        self.history: list[dict[str, Any]] = []
        self.metrics = metrics  # per-step rows (metrics.jsonl / TensorBoard / W&B): give it on every rank, rank 0 writes
        self._tokens: TokenCounter | None = None
        self.start_step = 0
        self._base_lrs = [g["lr"] for g in wrapped.optimizer.param_groups] if wrapped.optimizer is not None else []
        self._announce_resume()

    # -- one optimizer step -------------------------------------------------------------------------
    def step(self, batch: StepBatch) -> dict[str, Any]:
        for h in self.hooks:
            h.before_loss(batch)
        loss = self.loss(batch)
        for h in self.hooks:
            term = h.extra_loss(batch)
            if term is not None:
                loss = loss + term.to(loss.dtype)
        self.w.backward(loss)
        for h in self.hooks:
            for p, g in h.extra_grads(batch).items():
                self.w.add_full_grad(p, g)
        for h in self.hooks:
            h.after_backward(batch)
        norm = self.w.clip_grad_norm(self.cfg.max_grad_norm)
        self._set_lr(batch.step)
        self.w.step()
        row: dict[str, Any] = {}
        for h in self.hooks:
            h.after_step(batch, row)
        grad_norm = norm if norm is not None else self.w.engine_grad_norm()
        if grad_norm is not None:
            row["grad_norm"] = grad_norm  # global, before clipping
        row["step"] = batch.step
        row["records"] = batch.records
        return row

    def _set_lr(self, step: int) -> None:
        factor = lr_factor(self.cfg, step, self.plan.total_steps)
        if self.w.optimizer is not None:
            for group, base in zip(self.w.optimizer.param_groups, self._base_lrs):
                group["lr"] = base * factor

    # -- the run ------------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> list[dict[str, Any]]:
        """Train to the end (or resume there); returns the per-step log, identical on every rank.
        Raises :class:`TrainingPreempted` after checkpointing on SIGUSR1 / SIGTERM."""
        self._maybe_resume()
        self._tokens = TokenCounter(self.w.unwrapped) if self.metrics is not None else None
        try:
            self._loop(progress)
        finally:
            if self._tokens is not None:
                self._tokens.close()
        self._finish()
        return self.history

    def _loop(self, progress: bool) -> None:
        last_save = time.monotonic()
        with PreemptionHandler() as pre, _progress_bar(self.name, progress and is_main()) as bar:
            task = bar.add_task(self.name, total=self.plan.total_steps, completed=self.start_step, info="")
            for batch in self.plan.steps(self.start_step, self.rank, self.world):
                row = self.step(batch)
                self.history.append(row)
                self._log(batch, row)
                if batch.step % self.cfg.log_every == 0 or batch.step == self.plan.total_steps:
                    bar.update(task, completed=batch.step, info=_describe(row))
                stop, due = self._decide(pre, last_save, batch.step)
                if (stop or due) and batch.step < self.plan.total_steps:
                    self.save(batch.step)
                    last_save = time.monotonic()
                if stop and batch.step < self.plan.total_steps:
                    raise TrainingPreempted(batch.step, pre.exit_code())

    def _log(self, batch: StepBatch, row: dict[str, Any]) -> None:
        """Collective when metrics are on (the token count is reduced): the row, lr and throughput."""
        if self.metrics is None or self._tokens is None:
            return
        tokens = self._tokens.take(any(i >= 0 for i in batch.mine))
        self.metrics.log_step(batch.step, row, self.w.optimizer, samples=batch.n_real, tokens=tokens, stage=self.name)

    def _decide(self, pre: PreemptionHandler, last_save: float, step: int) -> tuple[bool, bool]:
        """Collective (one tiny all-reduce per step): (stop now, a checkpoint is due), the same on all ranks."""
        if self.ckpt is None:
            return False, False
        minutes = self.cfg.checkpoint_minutes
        timed = is_main() and minutes is not None and time.monotonic() - last_save >= 60 * minutes
        device = next(p for _, p in self.w.named_trainable()).device  # NCCL reduces CUDA tensors only
        flags = all_reduce_sum(torch.tensor([float(pre.requested), float(timed)], dtype=torch.float64, device=device))
        every = self.cfg.checkpoint_every
        return bool(flags[0] > 0), bool(flags[1] > 0) or bool(every and step % every == 0)

    # -- checkpoints ----------------------------------------------------------------------------------
    def _states(self) -> dict[str, Any]:
        return {"trainable": TrainableState(self.w), "hooks": HookStates(self.hooks)}

    def save(self, step: int) -> Path | None:
        """Collective: checkpoint after ``step`` (weights, optimizer, hook states, data position, log)."""
        if self.ckpt is None:
            return None
        extra = {"step": step, "global_batch": self.plan.global_batch, "fingerprint": self.fingerprint,
                 "total_steps": self.plan.total_steps, "history": self.history}
        return self.ckpt.save(step, self._states(), backend=self.w.backend, extra=extra)

    def _maybe_resume(self) -> None:
        path = self.ckpt.latest() if self.ckpt is not None else None
        if self.cfg.resume == "must" and path is None:
            raise ConfigError(f"{self.name}: resume=must, but there is no complete checkpoint to continue")
        if self.ckpt is None or self.cfg.resume == "never" or path is None:
            return
        extra = _run_extra(path)
        if extra.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"{path}: written by a run with other training settings or data (hash "
                              f"{extra.get('fingerprint')} != {self.fingerprint}); delete {self.ckpt.dir} to start afresh")
        self.plan = DataPlan(self.plan.records, int(extra["global_batch"]), self.plan.epochs, self.plan.seed,
                             self.plan.max_steps)
        self.ckpt.load(self._states(), path)
        self.start_step, self.history = int(extra["step"]), list(extra["history"])

    def _announce_resume(self) -> None:
        """Say at once (a resumed command's first line) from which step this run will continue."""
        path = self.ckpt.latest() if self.ckpt is not None and self.cfg.resume else None
        if path is None or not is_main():
            return
        import json

        from fisherdist.distributed.checkpoint import RUN_META

        meta = json.loads((path / RUN_META).read_text())
        extra = meta.get("extra", {})
        print(f"{self.name}: resuming from step {extra.get('step')} of {extra.get('total_steps')} ({path}, written by "
              f"{meta.get('world_size')} ranks under {meta.get('backend')}; global batch {extra.get('global_batch')})",
              flush=True)

    def _finish(self) -> None:
        """A finished run drops its checkpoints, so the same command later trains afresh."""
        if self.ckpt is None:
            return
        barrier()
        if is_main() and self.ckpt.dir.is_dir():
            shutil.rmtree(self.ckpt.dir)
        barrier()


def _run_extra(path: Path) -> dict[str, Any]:
    import json

    from fisherdist.distributed.checkpoint import RUN_META

    extra: dict[str, Any] = json.loads((path / RUN_META).read_text()).get("extra", {})
    return extra


def _describe(row: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))


def _progress_bar(name: str, show: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}")]
    return Progress(*columns, disable=not show, transient=True)
