"""SUV stage 4: train the LoRA adapter with DPO + lambda * R_Fisher, optionally projecting the gradient.

Data parallelism: step s of an epoch uses the global pairs ``[s*B*W, (s+1)*B*W)`` of a seeded permutation
(identical on every rank); rank r takes its B of them. Each rank's loss is ``W * sum(valid losses) / N_s``
with N_s the step's global number of real pairs, so the backend's gradient average is exactly the gradient
of the global mean loss -- the same update as one process with batch B*W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fisherdist.distributed.collectives import rank_world
from fisherdist.fisher.loss import per_sample_nll
from fisherdist.methods.suv.config import TrainSettings
from fisherdist.methods.suv.dpo import collate_pairs, dpo_loss, reference_logprobs, sequence_logprobs
from fisherdist.methods.suv.projection import RetainProjector
from fisherdist.methods.suv.regularizer import FisherBarrier
from fisherdist.methods.suv.schedule import LambdaSchedule


@dataclass
class PairTokens:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _slice(order: list[int], step: int, per_rank: int, rank: int, world: int) -> tuple[list[int], int]:
    """(this rank's indices into ``order``, padded with -1, and the step's global count of real items)."""
    lo = step * per_rank * world
    glob = order[lo : lo + per_rank * world]
    mine = [glob[i] if i < len(glob) else -1 for i in range(rank * per_rank, (rank + 1) * per_rank)]
    return mine, len(glob)


def _all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (the per-rank values are already scaled to sum to the global quantity)."""
    values = values.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


def _add_to_zero_grads(extra: dict[torch.Tensor, torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """Add full-size gradients to DeepSpeed's (partitioned, already averaged) gradients; returns ``value``."""
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

    for p, g in extra.items():
        current = safe_get_full_grad(p)
        safe_set_full_grad(p, current + g.to(current.dtype).view_as(current))
    return value


class SuvTrainer:
    """One object per training run: the wrapped model, its data, the regulariser and the projector."""

    def __init__(self, wrapped: Any, pairs: list[PairTokens], retain: list[list[int]], settings: TrainSettings,
                 pad_id: int, barrier: FisherBarrier | None = None) -> None:
        if not pairs:
            raise ValueError("no preference pairs to train on")
        self.w, self.pairs, self.retain, self.cfg, self.pad_id, self.barrier = wrapped, pairs, retain, settings, pad_id, barrier
        self.rank, self.world = rank_world()
        self.params = [p for p in wrapped.unwrapped.parameters() if p.requires_grad]
        zero = wrapped.backend.startswith("zero")
        self.projector = RetainProjector(self.params, settings.ema_alpha, zero) if settings.projection else None
        if settings.projection and not retain:
            raise ValueError("train.projection needs retain texts")
        self.schedule = LambdaSchedule(settings.lam, settings.lambda_schedule)
        self.device = next(iter(self.params)).device
        self.steps_per_epoch = math.ceil(len(pairs) / (settings.batch_size * self.world))
        total = self.steps_per_epoch * settings.epochs
        self.total_steps = min(total, settings.max_steps) if settings.max_steps else total
        self._retain_cursor = 0

    # -- losses -------------------------------------------------------------------------------------
    def _dpo(self, idx: list[int], n_real: int) -> torch.Tensor:
        real = [i for i in idx if i >= 0]
        items = [self.pairs[i] for i in (real or [0])]
        batch = collate_pairs([p.prompt for p in items], [p.chosen for p in items], [p.rejected for p in items],
                              self.pad_id, self.cfg.max_length)
        batch.input_ids, batch.attention_mask, batch.labels = (t.to(self.device) for t in
                                                               (batch.input_ids, batch.attention_mask, batch.labels))
        ref = reference_logprobs(self.w.unwrapped, batch)
        logits = self.w.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        pol = sequence_logprobs(logits, batch.labels)
        n = batch.pairs
        losses = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], self.cfg.beta)
        weight = 1.0 if real else 0.0  # a rank with only padding still runs the collectives, with zero loss
        return losses.sum() * weight * self.world / n_real

    def _retain_loss(self) -> torch.Tensor:
        """Mean per-text NLL of the next global retain batch (cycling through the retain texts)."""
        per = self.cfg.retain_batch_size
        start = self._retain_cursor
        self._retain_cursor = (start + per * self.world) % len(self.retain)
        idx = [(start + self.rank * per + i) % len(self.retain) for i in range(per)]
        rows = [self.retain[i][: self.cfg.max_length] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits = self.w.module(input_ids=ids, attention_mask=mask).logits
        return per_sample_nll(logits, ids.masked_fill(mask == 0, -100)).mean()

    # -- one optimizer step -------------------------------------------------------------------------
    def step(self, idx: list[int], n_real: int) -> dict[str, float]:
        lam = self.schedule.value
        if self.projector is not None:
            self.w.backward(self._retain_loss())
            self.projector.update()
            self.w.zero_grad()
        dpo = self._dpo(idx, n_real)
        loss = dpo
        reg = torch.zeros((), dtype=torch.float64)
        barrier_outside = self.w.backend == "zero3"  # ZeRO-3: the factors exist only inside the forward
        if self.barrier is not None and lam > 0 and not barrier_outside:
            term, reg = self.barrier.loss_term(lam)
            loss = loss + term.to(loss.dtype)
        self.w.backward(loss)
        if self.barrier is not None and lam > 0 and barrier_outside:
            reg = _add_to_zero_grads(*self.barrier.factor_gradients(lam))
        if self.projector is not None:
            self.projector.project()
        if self.cfg.max_grad_norm is not None and not self.w.backend.startswith("zero"):
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.w.step()
        dpo_global = float(_all_sum(dpo.double().reshape(1)) / self.world)
        self.schedule.step(dpo_global)
        return {"dpo": dpo_global, "fisher_reg": float(reg), "lambda": lam}

    def run(self, progress: bool = True) -> list[dict[str, float]]:
        """All epochs; returns the per-step log (identical on every rank)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        history: list[dict[str, float]] = []
        g = torch.Generator().manual_seed(self.cfg.seed)
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}")]
        with Progress(*columns, disable=not progress or self.rank != 0, transient=True) as bar:
            task = bar.add_task("train", total=self.total_steps, info="")
            for _epoch in range(self.cfg.epochs):
                order = torch.randperm(len(self.pairs), generator=g).tolist()
                for s in range(self.steps_per_epoch):
                    if len(history) >= self.total_steps:
                        return history
                    idx, n_real = _slice(order, s, self.cfg.batch_size, self.rank, self.world)
                    row = self.step(idx, n_real)
                    row["step"] = len(history) + 1
                    history.append(row)
                    bar.update(task, advance=1, info=f"dpo {row['dpo']:.4f}  R {row['fisher_reg']:.3g}")
        return history
