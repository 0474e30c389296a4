"""The SUV recipe schema: one YAML drives every stage (``fisherdist suv mine|prefs|fisher|train|eval|run``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fisherdist.config import DataFile, DistConfig, ModelConfig, Section, check_model_backend
from fisherdist.eval.memorization import MemorizationSettings
from fisherdist.eval.utility import UtilitySettings
from fisherdist.methods.suv.mine import MineSettings
from fisherdist.methods.suv.prefs import PrefsSettings
from fisherdist.models.peft_utils import LoraSettings
from fisherdist.recipes.train_config import OptimSettings


class SuvData(Section):
    """Input files (JSON Lines); ``@world/...`` points into the shipped tiny world."""

    books: DataFile = Field(description="protected passages or whole books, records {book, text}")
    retain: DataFile = Field(description="general text for the retain Fisher and the projection's retain loss")
    heldout: DataFile | None = Field(None, description="held-out general text for perplexity")
    task: DataFile | None = Field(None, description="downstream task records {prompt, response} for accuracy")
    text_field: str = "text"


class FisherSettings(Section):
    """The two Fisher passes over the frozen base q,k,v,o weights (per-sample empirical, mean convention)."""

    enabled: bool = True
    forbid_samples: int | None = Field(None, gt=0, description="first N preference rows (default: all)")
    retain_samples: int = Field(256, gt=0)
    batch_size: int = Field(4, gt=0, description="micro-batch per rank (the per-sample engine makes it exact)")
    max_length: int = Field(256, gt=0)
    eps1: float = Field(1e-6, gt=0, description="clamp floor of D = max(F_f - F_r + eps1, eps1)")
    eps2: float = Field(1e-6, gt=0, description="fisher_eps in log(1 + dW^2 / (D + eps2))")
    dtype: Literal["float32", "float64"] = "float32"
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


class SuvConfig(Section):
    """Schema of ``configs/suv/*.yaml``."""

    model: ModelConfig
    data: SuvData
    mine: MineSettings = Field(default_factory=MineSettings)
    prefs: PrefsSettings = Field(default_factory=PrefsSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    fisher: FisherSettings = Field(default_factory=FisherSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    memorization: MemorizationSettings = Field(default_factory=MemorizationSettings)
    utility: UtilitySettings = Field(default_factory=UtilitySettings)
    dist: DistConfig = Field(default_factory=DistConfig)
    deepspeed: dict[str, Any] | None = Field(None, description="DeepSpeed config for dist.backend=zero1/2/3")
    out: str = Field(description="output directory of every stage")
    base_copy: Literal["copy", "link"] = Field(
        "copy", description="models/base: a full HF copy of the base, or a symlink to model.path (real scale)")

    @model_validator(mode="after")
    def _backend_fits(self) -> SuvConfig:
        zero = self.dist.backend.startswith("zero")
        check_model_backend(self.model, self.dist)
        if self.deepspeed is not None and not zero:
            raise ValueError(f"deepspeed: given, but dist.backend={self.dist.backend} is not zero1/zero2/zero3")
        return self

    def backend_options(self) -> dict[str, Any]:
        """Extra keyword arguments of :func:`fisherdist.distributed.wrap.wrap_model` for this backend."""
        if not self.dist.backend.startswith("zero"):
            return {}
        ds = dict(self.deepspeed or {})
        ds.setdefault("train_micro_batch_size_per_gpu", self.train.batch_size)
        ds.setdefault("gradient_clipping", self.train.max_grad_norm or 0.0)
        return {"zero_config": ds}
