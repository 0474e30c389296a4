"""The SUV recipe schema: one YAML drives every stage (``fisherdist suv mine|prefs|fisher|train|eval|run``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fisherdist.config import DataFile, DataKeys
from fisherdist.eval.memorization import MemorizationSettings
from fisherdist.eval.utility import UtilitySettings
from fisherdist.methods.suv.mine import MineSettings
from fisherdist.methods.suv.prefs import PrefsSettings
from fisherdist.recipes.config import FisherPassSettings, LoraRunConfig
from fisherdist.recipes.train_config import OptimSettings


class SuvData(DataKeys):
    """Input files (JSON Lines); ``@world/...`` points into the shipped tiny world."""

    books: DataFile = Field(description="protected passages or whole books, records {book, text}")
    retain: DataFile = Field(description="general text for the retain Fisher and the projection's retain loss")
    heldout: DataFile | None = Field(None, description="held-out general text for perplexity")
    task: DataFile | None = Field(None, description="downstream task records {prompt, response} for accuracy")
    text_field: str = "text"


class FisherSettings(FisherPassSettings):
    """The forbidden and retain passes over the frozen base q,k,v,o weights, and the barrier built from them."""

    forbid_samples: int | None = Field(None, gt=0, description="first N preference rows (default: all)")
    retain_samples: int = Field(256, gt=0)
    eps1: float = Field(1e-6, gt=0, description="clamp floor of D = max(F_f - F_r + eps1, eps1)")
    eps2: float = Field(1e-6, gt=0, description="fisher_eps in log(1 + dW^2 / (D + eps2))")
    chunk_rows: int = Field(1024, gt=0, description="rows of BA formed at once by the log barrier")


class TrainSettings(OptimSettings):
    """DPO + lambda * R_Fisher on the LoRA factors, optionally with retain-gradient projection (the general
    optimisation, batch and checkpoint keys come from :class:`~fisherdist.recipes.train_config.OptimSettings`)."""

    beta: float = Field(0.1, gt=0)
    max_length: int = Field(512, gt=0)
    lam: float = Field(0.1, ge=0, description="lambda_F of the Fisher regulariser")
    lambda_schedule: Literal["constant", "adaptive"] = "constant"
    projection: bool = False
    ema_alpha: float = Field(0.9, gt=0, lt=1)
    retain_batch_size: int = Field(2, gt=0, description="retain texts per rank per step (projection)")

    @model_validator(mode="after")
    def _sane(self) -> TrainSettings:
        if self.lambda_schedule == "adaptive" and self.lam == 0:
            raise ValueError("lambda_schedule=adaptive needs lam > 0")
        return self


class SuvConfig(LoraRunConfig):
    """Schema of ``configs/suv/*.yaml``: the run keys of :class:`LoraRunConfig` plus SUV's own sections."""

    data: SuvData
    mine: MineSettings = Field(default_factory=MineSettings)
    prefs: PrefsSettings = Field(default_factory=PrefsSettings)
    fisher: FisherSettings = Field(default_factory=FisherSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    memorization: MemorizationSettings = Field(default_factory=MemorizationSettings)
    utility: UtilitySettings = Field(default_factory=UtilitySettings)
