"""SUV stage 4: train the LoRA adapter with DPO + lambda * R_Fisher, optionally projecting the gradient,
on the shared :class:`~fisherdist.recipes.trainer.Trainer` (checkpoints, resume, preemption come from it).

Data parallelism: the trainer hands every step its global pairs and this rank's slots. Each rank's loss is
``W * sum(valid losses) / N_s`` with N_s the step's global number of real pairs, so the backend's gradient
average is exactly the gradient of the global mean loss -- the same update as one process with the whole
global batch. The projection's retain loss is scaled the same way over its own global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fisherdist.distributed.collectives import all_reduce_sum, rank_world
from fisherdist.distributed.wrap import Wrapped
from fisherdist.errors import ConfigError
from fisherdist.fisher.loss import per_sample_nll
from fisherdist.methods.suv.config import TrainSettings
from fisherdist.methods.suv.projection import RetainProjector
from fisherdist.methods.suv.regularizer import FisherBarrier
from fisherdist.methods.suv.schedule import LambdaSchedule
from fisherdist.recipes.losses import collate_pairs, dpo_loss, reference_logprobs, sequence_logprobs
from fisherdist.recipes.trainer import StepBatch, Trainer, TrainHook


@dataclass
class PairTokens:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class RetainProjection(TrainHook):
    """Before each step: the retain loss's gradient into the projector's EMA; after backward: project.
    The retain texts cycle with a global cursor, so the batches do not depend on the world size."""

    name = "projection"

    def __init__(self, w: Wrapped, retain: list[list[int]], settings: TrainSettings, pad_id: int) -> None:
        if not retain:
            raise ConfigError("train.projection needs retain texts")
        self.w, self.retain, self.cfg, self.pad_id = w, retain, settings, pad_id
        self.named = w.named_trainable()
        self.projector = RetainProjector([p for _, p in self.named], settings.ema_alpha, w.engine_owns_grads)
        self.rank, self.world = rank_world()
        self.global_batch = settings.retain_batch_size * self.world
        self.cursor = 0

    def _rows(self) -> tuple[list[list[int]], list[bool]]:
        """This rank's slots of the next global retain batch (empty slots repeat a text with weight 0)."""
        per = -(-self.global_batch // self.world)
        slots = range(self.rank * per, (self.rank + 1) * per)
        rows = [self.retain[(self.cursor + i) % len(self.retain)][: self.cfg.max_length] for i in slots]
        self.cursor = (self.cursor + self.global_batch) % len(self.retain)
        return rows, [i < self.global_batch for i in slots]

    def _loss(self) -> torch.Tensor:
        """``W * sum(per-text NLL) / G``: the ranks' average is the global batch's mean per-text NLL."""
        rows, valid = self._rows()
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        device = next(iter(self.projector.params)).device
        ids, mask = ids.to(device), mask.to(device)
        logits = self.w.module(input_ids=ids, attention_mask=mask).logits
        nll = per_sample_nll(logits, ids.masked_fill(mask == 0, -100))
        weight = torch.tensor(valid, dtype=nll.dtype, device=nll.device)
        return (nll * weight).sum() * self.world / self.global_batch

    def before_loss(self, batch: StepBatch) -> None:
        self.w.backward(self._loss())
        self.projector.update()
        self.w.zero_grad()

    def after_backward(self, batch: StepBatch) -> None:
        self.projector.project()

    def state_dict(self) -> dict[str, Any]:
        if self.projector.ema is None:  # only before the first step; a load target needs the tensors
            self.projector.ema = [self._zeros(p) for _, p in self.named]
        ema = {f"ema.{n}": self._as_saved(p, e) for (n, p), e in zip(self.named, self.projector.ema)}
        return {**ema, "cursor": self.cursor, "global_batch": self.global_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        assert self.projector.ema is not None  # state_dict() ran first (DCP loads into it)
        for (n, _), e in zip(self.named, self.projector.ema):
            e.copy_(_local(state_dict[f"ema.{n}"]))
        self.cursor, self.global_batch = int(state_dict["cursor"]), int(state_dict["global_batch"])

    def _zeros(self, p: torch.Tensor) -> torch.Tensor:
        if self.w.engine_owns_grads:  # full-size gradients (ZeRO-3 keeps the full shape in ds_shape)
            return torch.zeros(tuple(getattr(p, "ds_shape", p.shape)), dtype=torch.float32, device=p.device)
        return torch.zeros_like(_local(p))

    def _as_saved(self, p: torch.Tensor, ema: torch.Tensor) -> torch.Tensor:
        """The EMA in its parameter's sharding: a DTensor under FSDP2 (so DCP reshards it), else as is."""
        if self.w.engine_owns_grads or not hasattr(p, "device_mesh"):
            return ema
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(ema, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


class SuvTrainer(TrainHook):
    """SUV's step on the shared trainer: the DPO loss, the Fisher barrier (a loss term, or under ZeRO-3 a
    full-size gradient) and the lambda schedule; the projection is a separate hook."""

    name = "suv"

    def __init__(self, wrapped: Wrapped, pairs: list[PairTokens], retain: list[list[int]], settings: TrainSettings,
                 pad_id: int, barrier: FisherBarrier | None = None, checkpoint_dir: str | Path | None = None) -> None:
        if not pairs:
            raise ConfigError("no preference pairs to train on")
        self.w, self.pairs, self.cfg, self.pad_id, self.barrier = wrapped, pairs, settings, pad_id, barrier
        self.schedule = LambdaSchedule(settings.lam, settings.lambda_schedule)
        self.device = next(p for _, p in wrapped.named_trainable()).device
        hooks: list[TrainHook] = [RetainProjection(wrapped, retain, settings, pad_id)] if settings.projection else []
        self.trainer = Trainer(wrapped, len(pairs), settings, self._dpo, hooks=[*hooks, self],
                               checkpoint_dir=checkpoint_dir, name="train", fingerprint=_pairs_hash(pairs))
        self._lam, self._dpo_value = 0.0, torch.zeros(())
        self._reg = torch.zeros((), dtype=torch.float64)

    def run(self, progress: bool = True) -> list[dict[str, Any]]:
        """All epochs; returns the per-step log (identical on every rank)."""
        return self.trainer.run(progress)

    # -- the loss -------------------------------------------------------------------------------------
    def _dpo(self, batch: StepBatch) -> torch.Tensor:
        real = [i for i in batch.mine if i >= 0]
        items = [self.pairs[i] for i in (real or [0])]
        pb = collate_pairs([p.prompt for p in items], [p.chosen for p in items], [p.rejected for p in items],
                           self.pad_id, self.cfg.max_length)
        pb.input_ids, pb.attention_mask, pb.labels = (t.to(self.device) for t in (pb.input_ids, pb.attention_mask, pb.labels))
        ref = reference_logprobs(self.w.unwrapped, pb)
        logits = self.w.module(input_ids=pb.input_ids, attention_mask=pb.attention_mask).logits
        pol = sequence_logprobs(logits, pb.labels)
        n = pb.pairs
        losses = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], self.cfg.beta)
        weight = 1.0 if real else 0.0  # a rank with only padding still runs the collectives, with zero loss
        self._dpo_value = losses.sum() * weight * batch.world / batch.n_real
        return self._dpo_value

    # -- hook: barrier and schedule ---------------------------------------------------------------------
    def before_loss(self, batch: StepBatch) -> None:
        self._lam = self.schedule.value
        self._reg = torch.zeros((), dtype=torch.float64)

    def _barrier_on(self) -> bool:
        return self.barrier is not None and self._lam > 0

    def extra_loss(self, batch: StepBatch) -> torch.Tensor | None:
        if not self._barrier_on() or self.w.params_gathered_in_forward:
            return None
        assert self.barrier is not None
        term, self._reg = self.barrier.loss_term(self._lam)
        return term

    def extra_grads(self, batch: StepBatch) -> dict[torch.Tensor, torch.Tensor]:
        if not self._barrier_on() or not self.w.params_gathered_in_forward:
            return {}  # ZeRO-3: the factors exist only inside the forward, so the barrier enters as a gradient
        assert self.barrier is not None
        grads, self._reg = self.barrier.factor_gradients(self._lam)
        return grads

    def after_step(self, batch: StepBatch, row: dict[str, Any]) -> None:
        dpo_global = float(all_reduce_sum(self._dpo_value.detach().double().reshape(1).clone()) / batch.world)
        self.schedule.step(dpo_global)
        row.update(dpo=dpo_global, fisher_reg=float(self._reg), **{"lambda": self._lam})

    def state_dict(self) -> dict[str, Any]:
        s = self.schedule
        return {"lambda": s.value, "best": s.best, "stalled": s.stalled}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        s = self.schedule
        s.value, s.best, s.stalled = float(state_dict["lambda"]), float(state_dict["best"]), int(state_dict["stalled"])


def _pairs_hash(pairs: list[PairTokens]) -> str:
    """Identifies the training data in the checkpoint: a resume over other pairs is refused."""
    import hashlib

    h = hashlib.sha256()
    for p in pairs:
        h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
    return h.hexdigest()[:16]
