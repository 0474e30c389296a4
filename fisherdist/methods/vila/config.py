"""The VILA / FILA recipe schema: one YAML drives every stage (``fisherdist vila importance|init|train|eval|run``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fisherdist.config import DataFile, DataKeys, Section
from fisherdist.eval.tofu import TofuSettings
from fisherdist.eval.utility import UtilitySettings
from fisherdist.recipes.config import LoraRunConfig
from fisherdist.recipes.train_config import OptimSettings


class VilaData(DataKeys):
    """TOFU-format JSON Lines: ``{question, answer, paraphrased_answer, perturbed_answer: [...]}``
    (the last two only for the truth ratio); ``@world/...`` points into the shipped tiny world."""

    forget: DataFile = Field(description="question-answer records to unlearn")
    retain: DataFile = Field(description="question-answer records to keep (retain loss, retain Fisher, utility)")
    heldout: DataFile | None = Field(None, description="held-out general text {text} for perplexity")
    task: DataFile | None = Field(None, description="downstream task {prompt, response} for accuracy / utility")


class ImportanceSettings(Section):
    """The importance pass: forget and retain Fisher in one pass over both sets."""

    sigma: float = Field(0.05, gt=0, description="VILA: std of both LoRA factors during the pass")
    passes: int = Field(1, gt=0, description="passes over the data (the official VILA runs 10)")
    batch_size: int = Field(4, gt=0, description="records per rank per micro-batch")
    max_length: int = Field(128, gt=1)
    dtype: Literal["float32", "float64"] = "float32"


class VilaTrain(OptimSettings):
    """Unlearning on the LoRA factors: forget term + retain_weight x retain NLL."""

    loss: Literal["gd", "ihl", "npo"] = Field("gd", description="gradient difference, inverted hinge, or NPO")
    retain_weight: float = Field(1.0, ge=0, description="lambda (lcoef) of the retain NLL")
    beta: float = Field(0.5, gt=0, description="NPO temperature")
    max_length: int = Field(128, gt=1)


class VilaEval(Section):
    """TOFU-style evaluation before and after (and of the retain-only reference, for forget quality)."""

    retain_model: str | None = Field(None, description="retain-only model directory (forget-quality reference)")
    tofu: TofuSettings = Field(default_factory=TofuSettings)
    utility: UtilitySettings = Field(default_factory=UtilitySettings)


class VilaConfig(LoraRunConfig):
    """Schema of ``configs/vila/*.yaml``."""

    method: Literal["vila", "fila"] = Field("vila", description="importance inside the LoRA subspace (vila) or "
                                            "on the full base weights (fila)")
    data: VilaData
    importance: ImportanceSettings = Field(default_factory=ImportanceSettings)
    train: VilaTrain = Field(default_factory=VilaTrain)
    eval: VilaEval = Field(default_factory=VilaEval)
    per_method: dict[Literal["vila", "fila"], dict[str, Any]] = Field(
        default_factory=dict, description="train: keys tuned per method (e.g. its lr, bench/vila_sweep.py); "
        "a key set under train: itself, in the file or on the command line, wins")

    @model_validator(mode="before")
    @classmethod
    def _per_method_train(cls, data: Any) -> Any:
        """Fill the train: keys left unset from per_method.<method>: each method keeps its own tuned lr when
        one recipe serves both (``method=fila`` on the command line), and an explicit train: key still wins."""
        if not isinstance(data, dict) or not isinstance(data.get("per_method"), dict):
            return data
        for name, keys in data["per_method"].items():
            unknown = sorted(set(keys) - set(VilaTrain.model_fields)) if isinstance(keys, dict) else []
            if unknown:
                raise ValueError(f"per_method.{name}: {unknown} are not keys of train:")
        chosen, train = data["per_method"].get(data.get("method", "vila")) or {}, data.get("train") or {}
        if not isinstance(chosen, dict) or not isinstance(train, dict):
            return data  # the field validators name the bad section
        return {**data, "train": {**chosen, **train}}
