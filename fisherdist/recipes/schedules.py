"""Schedules of a regulariser's weight lambda driven by the main loss: constant, or adaptive decay (SUV-AS)."""

from __future__ import annotations

from typing import Literal


class LambdaSchedule:
    """``constant``: lambda never changes. ``adaptive`` (SUV-AS, ``ScheduledLambdaFisherAdaptive``):
    x``improve_decay`` whenever the DPO loss improves on its best so far, x``stall_decay`` after
    ``patience`` consecutive non-improving steps (the counter then restarts)."""

    def __init__(self, lam: float, kind: Literal["constant", "adaptive"] = "constant", improve_decay: float = 0.99,
                 stall_decay: float = 0.9, patience: int = 5) -> None:
        self.value = lam
        self.kind = kind
        self.improve_decay = improve_decay
        self.stall_decay = stall_decay
        self.patience = patience
        self.best = float("inf")
        self.stalled = 0

    def step(self, dpo_loss: float) -> float:
        """Update after one optimizer step with that step's DPO loss; return the lambda for the next step."""
        if self.kind == "constant":
            return self.value
        if dpo_loss < self.best:
            self.best = dpo_loss
            self.stalled = 0
            self.value *= self.improve_decay
        else:
            self.stalled += 1
            if self.stalled >= self.patience:
                self.value *= self.stall_decay
                self.stalled = 0
        return self.value
