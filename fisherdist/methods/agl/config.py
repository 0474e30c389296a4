"""The AlignGuard-LoRA recipe schema: one YAML drives ``fisherdist agl fisher|train|eval|run``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fisherdist.config import DataFile, DataKeys, Section
from fisherdist.methods.agl.penalty import AglWeights
from fisherdist.methods.sft import SftTrain
from fisherdist.recipes.config import LoraRunConfig

ARMS = ("lora", "ewc", "agl")
"""The three fine-tunings ``run`` compares, on the same data and step budget."""
BACKENDS = ("none", "ddp", "fsdp2", "zero1", "zero2", "zero3")
"""Backends on which the EWC and AGL penalties run (``methods/agl/rows.py``: each rank its block of output
rows; FSDP1's flat parameters hold no per-module LoRA rows)."""


class AglData(DataKeys):
    """Input files (JSON Lines); ``@world/...`` points into the shipped tiny world."""

    train: DataFile = Field(description="fine-tuning records {prompt, response} (the drift set)")
    task_eval: DataFile = Field(description="held-out fine-tuning records {prompt, response}")
    alignment: list[DataFile] = Field(min_length=1, description="alignment records {prompt, response} for the Fisher")
    unsafe: DataFile = Field(description="unsafe prompts {prompt} (refusal rate)")
    safe: DataFile = Field(description="safe prompts {prompt} (over-refusal)")
    heldout: DataFile = Field(description="held-out general text {text} (perplexity)")
    refusal: str = Field(" I'm sorry, but I can't help with that.", description="the reference refusal")


class AglFisher(Section):
    """The alignment Fisher pass (once, on the aligned base model, before fine-tuning)."""

    subspace: int = Field(16, gt=0, description="m: eigenvectors per module of the output-side K-FAC factor")
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(64, gt=1)


class AglTrain(SftTrain):
    """Fine-tuning of every arm: the SFT recipe's keys (``SftTrain``: every arm is one ``run_sft``) plus
    the penalties' own."""

    max_length: int = Field(64, gt=1)
    align_rank: int = Field(8, gt=0, description="rank of the alignment adapter dW_A = s U C A_a")
    weights: AglWeights = Field(default_factory=AglWeights)
    lambda_ewc: float = Field(1.0, ge=0, description="EWC baseline: lambda * sum F (s B A)^2, F mean-normalised")
    curve_every: int = Field(10, gt=0, description="steps between forgetting-curve points (unsafe refusal rate)")
    arms: list[Literal["lora", "ewc", "agl"]] = Field(default_factory=lambda: list(ARMS), min_length=1)


class AglConfig(LoraRunConfig):
    """Schema of ``configs/agl/*.yaml``: the run keys of :class:`LoraRunConfig` plus AGL's own sections."""

    data: AglData
    fisher: AglFisher = Field(default_factory=AglFisher)
    train: AglTrain = Field(default_factory=AglTrain)

    @model_validator(mode="after")
    def _penalties_fit_backend(self) -> AglConfig:
        penalised = [a for a in self.train.arms if a != "lora"]
        if penalised and self.dist.backend not in BACKENDS:
            raise ValueError(f"dist.backend={self.dist.backend}: train.arms {penalised} need one of "
                             f"{', '.join(BACKENDS)} (FSDP1's flat parameters have no per-module LoRA rows)")
        return self
