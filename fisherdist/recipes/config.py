"""Config bases: the keys every method run shares, so a method's schema adds only its own sections.

``RunConfig``: model, dist, deepspeed, out, base_copy (with the backend checks), log (metrics sinks); ``LoraRunConfig`` adds the
``lora:`` section; ``FisherPassSettings`` is a Fisher pass over a live training model, turned into the
engine's :class:`~fisherdist.fisher.spec.FisherSpec` for the parameters a method picks.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fisherdist.config import DistConfig, ModelConfig, Section, check_model_backend
from fisherdist.fisher.spec import Estimator, FisherSpec, Granularity
from fisherdist.metrics import LogSettings
from fisherdist.models.peft_utils import LoraSettings


class RunConfig(Section):
    """One method run: which model, on which backend, writing where."""

    model: ModelConfig
    dist: DistConfig = Field(default_factory=DistConfig)
    deepspeed: dict[str, Any] | None = Field(None, description="DeepSpeed config for dist.backend=zero1/2/3")
    out: str = Field(description="output directory of every stage")
    base_copy: Literal["copy", "link"] = Field(
        "copy", description="models/base: a full HF copy of the base, or a symlink to model.path (real scale)")
    log: LogSettings = Field(default_factory=LogSettings, description="per-step scalars: out/metrics.jsonl always, "
                             "TensorBoard and W&B when asked")

    @model_validator(mode="after")
    def _backend_fits(self) -> RunConfig:
        check_model_backend(self.model, self.dist)
        if self.deepspeed is not None and not self.dist.backend.startswith("zero"):
            raise ValueError(f"deepspeed: given, but dist.backend={self.dist.backend} is not zero1/zero2/zero3")
        return self

    def backend_options(self, micro_batch: int, max_grad_norm: float | None) -> dict[str, Any]:
        """Extra keyword arguments of :func:`fisherdist.distributed.wrap.wrap_model` for this backend."""
        if not self.dist.backend.startswith("zero"):
            return {}
        ds = dict(self.deepspeed or {})
        ds.setdefault("train_micro_batch_size_per_gpu", micro_batch)
        ds.setdefault("gradient_clipping", max_grad_norm or 0.0)
        return {"zero_config": ds}


class LoraRunConfig(RunConfig):
    """A run that trains a LoRA adapter on the frozen base."""

    lora: LoraSettings = Field(default_factory=LoraSettings)


class FisherPassSettings(Section):
    """A Fisher pass on the training model (per-sample empirical by default, mean convention)."""

    enabled: bool = True
    estimator: Estimator = "empirical"
    granularity: Granularity = "sample"
    batch_size: int = Field(4, gt=0, description="micro-batch per rank (the per-sample engine makes it exact)")
    max_length: int = Field(256, gt=0)
    dtype: Literal["float32", "float64"] = "float32"

    def spec(self, params: list[str]) -> FisherSpec:
        """The engine's spec for the parameters matching ``params`` (fnmatch patterns on FQNs)."""
        return FisherSpec(estimator=self.estimator, granularity=self.granularity, params=params, dtype=self.dtype)
