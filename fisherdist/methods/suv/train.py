"""SUV stage 4: train the LoRA adapter with DPO + lambda * R_Fisher, optionally projecting the gradient,
on the shared :class:`~fisherdist.recipes.trainer.Trainer` (checkpoints, resume, preemption come from it;
the DPO step loss and the retain stream come from :mod:`fisherdist.recipes`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fisherdist.distributed.collectives import all_reduce_sum
from fisherdist.distributed.wrap import Wrapped
from fisherdist.errors import ConfigError
from fisherdist.methods.suv.config import TrainSettings
from fisherdist.methods.suv.projection import RetainProjector
from fisherdist.methods.suv.regularizer import FisherBarrier
from fisherdist.metrics import MetricsLogger
from fisherdist.recipes.preference import PairTokens, dpo_step_loss, pairs_fingerprint
from fisherdist.recipes.retain import CycledTexts
from fisherdist.recipes.schedules import LambdaSchedule
from fisherdist.recipes.train_state import grad_buffer, load_buffer, saved_like
from fisherdist.recipes.trainer import StepBatch, Trainer, TrainHook


class RetainProjection(TrainHook):
    """Before each step: the retain loss's gradient into the projector's EMA; after backward: project."""

    name = "projection"

    def __init__(self, w: Wrapped, retain: list[list[int]], settings: TrainSettings, pad_id: int) -> None:
        if not retain:
            raise ConfigError("train.projection needs retain texts")
        self.w, self.named = w, w.named_trainable()
        self.projector = RetainProjector([p for _, p in self.named], settings.ema_alpha, w.engine_owns_grads)
        self.texts = CycledTexts(retain, settings.retain_batch_size, settings.max_length, pad_id)

    def before_loss(self, batch: StepBatch) -> None:
        self.w.backward(self.texts.loss(self.w.module, next(iter(self.projector.params)).device))
        self.projector.update()
        self.w.zero_grad()

    def after_backward(self, batch: StepBatch) -> None:
        self.projector.project()

    def state_dict(self) -> dict[str, Any]:
        if self.projector.ema is None:  # only before the first step; a load target needs the tensors
            self.projector.ema = [grad_buffer(self.w, p) for _, p in self.named]
        ema = {f"ema.{n}": saved_like(self.w, p, e) for (n, p), e in zip(self.named, self.projector.ema)}
        return {**ema, **self.texts.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        assert self.projector.ema is not None  # state_dict() ran first (DCP loads into it)
        for (n, _), e in zip(self.named, self.projector.ema):
            load_buffer(e, state_dict[f"ema.{n}"])
        self.texts.load_state_dict(state_dict)


class SuvTrainer(TrainHook):
    """SUV's step on the shared trainer: the DPO loss, the Fisher barrier (a loss term, or under ZeRO-3 a
    full-size gradient) and the lambda schedule; the projection is a separate hook."""

    name = "suv"

    def __init__(self, wrapped: Wrapped, pairs: list[PairTokens], retain: list[list[int]], settings: TrainSettings,
                 pad_id: int, barrier: FisherBarrier | None = None, checkpoint_dir: str | Path | None = None,
                 metrics: MetricsLogger | None = None) -> None:
        if not pairs:
            raise ConfigError("no preference pairs to train on")
        self.w, self.pairs, self.cfg, self.pad_id, self.barrier = wrapped, pairs, settings, pad_id, barrier
        self.schedule = LambdaSchedule(settings.lam, settings.lambda_schedule)
        hooks: list[TrainHook] = [RetainProjection(wrapped, retain, settings, pad_id)] if settings.projection else []
        self.trainer = Trainer(wrapped, len(pairs), settings, self._dpo, hooks=[*hooks, self],
                               checkpoint_dir=checkpoint_dir, name="train", fingerprint=pairs_fingerprint(pairs),
                               metrics=metrics)
        self._lam, self._dpo_value = 0.0, torch.zeros(())
        self._reg = torch.zeros((), dtype=torch.float64)

    def run(self, progress: bool = True) -> list[dict[str, Any]]:
        """All epochs; returns the per-step log (identical on every rank)."""
        return self.trainer.run(progress)

    def _dpo(self, batch: StepBatch) -> torch.Tensor:
        self._dpo_value = dpo_step_loss(self.w, self.pairs, batch, self.pad_id, self.cfg.max_length, self.cfg.beta)
        return self._dpo_value

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
