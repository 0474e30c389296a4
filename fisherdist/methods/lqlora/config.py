"""The LQ-LoRA recipe schema: one YAML drives ``fisherdist lqlora fisher|decompose|train|export|run``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fisherdist.config import DataFile, DataKeys, Section
from fisherdist.models.quant import QConfig
from fisherdist.recipes.config import FisherPassSettings, LoraRunConfig
from fisherdist.recipes.train_config import SequenceSettings


class LqData(DataKeys):
    """JSON Lines files of ``{text}`` records (``@world/...`` points into the shipped tiny world)."""

    calibration: DataFile = Field(description="text for the Fisher pass (the paper: C4 training sequences)")
    train: DataFile = Field(description="text to fine-tune the low-rank part on (language modelling)")
    heldout: DataFile | None = Field(None, description="held-out text: perplexity of decomposed vs fine-tuned")
    text_field: str = "text"


class LqFisher(FisherPassSettings):
    """The calibration pass; ``enabled: false`` gives data-agnostic LQ-LoRA (plain Frobenius error)."""

    samples: int = Field(256, gt=0, description="calibration sequences (the paper: 10,000 of length 1024)")


class LqDecompose(Section):
    """Cost tables over a configuration grid, the ILP under ``budget``, and the final decomposition."""

    budget: float = Field(3.5, gt=0, description="average bits per parameter of the quantized part")
    grid: list[str] | Literal["small", "full"] = Field(
        "full", description="full (432 configurations), small (8), or a list of names such as [nf3, nf4]")
    qconfig: str | None = Field(None, description="skip grid and ILP: this configuration for every matrix")
    iters: int = Field(100, gt=0, description="maximum alternations (stops when the weighted error rises)")
    cost_iters: int | None = Field(None, gt=0, description="alternations for the cost tables (default: iters)")
    svd: Literal["randomized", "exact"] = "randomized"
    targets: str = Field(r".*_proj\.weight$", description="regex over checkpoint weight names")
    time_limit: float = Field(60.0, gt=0, description="ILP solver seconds")

    @field_validator("grid", "qconfig")
    @classmethod
    def _names(cls, v: object) -> object:
        for name in v if isinstance(v, list) else ([v] if isinstance(v, str) and v not in ("small", "full") else []):
            QConfig.parse(name)
        return v


    def configs(self) -> list[QConfig]:
        """The grid's configurations."""
        from fisherdist.methods.lqlora.grid import grid

        return grid(self.grid) if isinstance(self.grid, str) else [QConfig.parse(n) for n in self.grid]

    @model_validator(mode="after")
    def _feasible(self) -> LqDecompose:
        least = min(c.bits_per_param() for c in self.configs())
        if self.qconfig is None and least > self.budget:
            raise ValueError(f"budget {self.budget} is impossible: the cheapest configuration of the grid needs "
                             f"{least:.6g} bits per parameter")
        return self


class LqTrain(SequenceSettings):
    """Fine-tuning of L1 L2 (LoRA) with Q frozen: token-mean NLL on ``data.train``."""

    max_length: int = Field(256, gt=1)
    num_samples: int | None = Field(None, gt=0, description="first N training texts (default: all)")


class LqloraConfig(LoraRunConfig):
    """Schema of ``configs/lqlora/*.yaml``: the run keys plus LQ-LoRA's sections. The decomposition rank is
    ``lora.r`` (the adapter starts as L1 L2), and ``lora.targets`` must adapt every decomposed matrix."""

    data: LqData
    fisher: LqFisher = Field(default_factory=LqFisher)
    decompose: LqDecompose = Field(default_factory=LqDecompose)
    train: LqTrain = Field(default_factory=LqTrain)

    @model_validator(mode="after")
    def _sharded_load(self) -> LqloraConfig:
        if self.model.load == "sharded" and self.dist.backend != "fsdp2":
            raise ValueError("model.load=sharded: LQ-LoRA's packed layers need dist.backend=fsdp2")
        return self
