"""What to accumulate: estimator x granularity x target parameters (the engine's typed options)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fisherdist.config import Section

Estimator = Literal["empirical", "centered", "true", "pseudo", "rank1", "kfac"]
Granularity = Literal["sample", "microbatch", "batch"]

# Which running sums each estimator needs: "sq" = sum_i w_i g_i**2, "first" = sum_i w_i g_i.
ESTIMATOR_STATS: dict[str, tuple[str, ...]] = {
    "empirical": ("sq",),
    "true": ("sq",),
    "pseudo": ("sq",),
    "centered": ("sq", "first"),
    "rank1": ("first",),
    "kfac": ("sum",),  # Kronecker factors A and G of Linear layers (fisher/kfac.py)
}

# Where labels come from: the data, the model's own samples (true Fisher), or its argmax (pseudo-label).
LABEL_SOURCE: dict[str, str] = {
    "empirical": "data",
    "centered": "data",
    "rank1": "data",
    "true": "sampled",
    "pseudo": "argmax",
    "kfac": "data",
}


class FisherSpec(Section):
    """The ``fisher:`` section of a config, and the options of :class:`FisherAccumulator`."""

    estimator: Estimator = "empirical"
    granularity: Granularity = "sample"
    params: list[str] = Field(default_factory=lambda: ["*"], min_length=1, description="fnmatch patterns on FQNs")
    token_weighted: bool = Field(False, description="weight each sample / micro-batch by its label tokens (FILA/VILA)")
    mc_samples: int = Field(1, ge=1, description="labels drawn per input for the true (Monte-Carlo) Fisher")
    seed: int = 0
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0, description="fail when more samples than this had NaN/inf")
    dtype: Literal["float32", "float64"] = "float32"
    bucket_mb: float = Field(25.0, gt=0, description="ZeRO: MiB of statistics per streamed reduce-scatter bucket "
                             "(peak per rank = owned share + one bucket)")
    decay: float | None = Field(None, gt=0.0, lt=1.0, description="online (EMA) Fisher: sums and counts are "
                                "multiplied by this at every optimizer step before the step's statistics are added")
    kfac_factors: Literal["both", "output"] = Field("both", description="K-FAC: both factors, or only the "
                                                    "output-side G (A is never formed)")
    kfac_tokens: Literal["labelled", "context"] = Field(
        "labelled", description="K-FAC positions: the loss-carrying ones, or every position up to a sample's last "
        "loss-carrying one (its prompt too: through attention a prompt token's keys and values reach the loss)")

    @field_validator("estimator", mode="before")
    @classmethod
    def _yaml_true(cls, value: object) -> object:
        """YAML reads a bare ``true`` (the true-Fisher estimator) as a boolean."""
        return "true" if value is True else value

    @model_validator(mode="after")
    def _compatible(self) -> FisherSpec:
        if self.granularity == "batch" and self.token_weighted:
            raise ValueError("token_weighted applies to sample and microbatch granularity, not batch")
        if self.estimator == "kfac" and self.granularity != "sample":
            raise ValueError("estimator kfac builds factors from per-token activations: use granularity sample")
        if self.mc_samples > 1 and self.estimator != "true":
            raise ValueError(f"mc_samples={self.mc_samples} only applies to estimator 'true'")
        return self

    @property
    def stats(self) -> tuple[str, ...]:
        return ESTIMATOR_STATS[self.estimator]
