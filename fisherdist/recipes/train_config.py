"""Optimisation keys every training stage shares (a method's ``train:`` section extends :class:`OptimSettings`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fisherdist.config import ResumeMode, Section


class OptimSettings(Section):
    """Optimizer, schedule, global batch and checkpointing of one training stage."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="after warmup: keep lr, or decay it to 0 at the last step (linearly / cosine)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from lr/(warmup+1) to lr over these steps")
    epochs: int = Field(2, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(2, gt=0, description="records per rank per step (the global batch is fixed at the first "
                                                 "start: batch_size x ranks; a resume on other ranks keeps it)")
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(1, gt=0, description="steps between metric updates of the progress line")
    checkpoint_every: int | None = Field(
        500, gt=0, description="steps between checkpoints (none: only on preemption / time)")
    checkpoint_minutes: float | None = Field(
        30.0, gt=0, description="also checkpoint when this long has passed since the last one (rank 0's clock)")
    keep_checkpoints: int = Field(2, gt=0, description="complete checkpoints kept (older ones are deleted)")
    resume: ResumeMode = Field("auto", description="auto: continue from the newest complete checkpoint of this stage, "
                               "if any; never: start over; must: fail without one")


class SequenceSettings(OptimSettings):
    """The trainer's keys plus the token length a record is cut to: what :func:`fisherdist.methods.sft.run_sft`
    reads, shared by every recipe that trains through it."""

    max_length: int = Field(128, gt=1)
