"""Supervised fine-tuning: ONE recipe behind ``fisherdist sft`` (LoRA), ``fisherdist finetune`` (any
adapter or full weights, any optimizer in ``optim:``) and ``fisherdist pretrain`` (plain text, full
weights, optionally from random initial weights), and behind :func:`run_sft`, which other methods call
(AlignGuard-LoRA's plain-LoRA baseline).

The loss scores the response only (``data.prompt_field: null``: the whole text after the special prefix,
i.e. causal-LM pretraining). Data parallelism and resume come from the shared trainer: each rank's loss is
its summed response NLL times W over the step's global response-token count, so the backend's gradient
average is the gradient of the global token-mean NLL, whatever the world size.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from fisherdist.commands import config_command
from fisherdist.config import DataFile, DataKeys
from fisherdist.data.jsonl import encode, read_records, special_prefix, split_encode
from fisherdist.metrics import MetricsLogger
from fisherdist.models.peft_utils import LoraSettings
from fisherdist.recipes.cli import run_stages
from fisherdist.recipes.config import RunConfig
from fisherdist.recipes.losses import collate_prompted, step_mean, token_mean_share
from fisherdist.recipes.optimizers import OptimizerSettings
from fisherdist.recipes.stages import ALL, RunContext, StageRegistry
from fisherdist.recipes.train_config import SequenceSettings
from fisherdist.recipes.trainer import StepBatch, Trainer, TrainHook

Prompted = tuple[list[int], list[int]]
"""One record as token ids: (special prefix + prompt, response)."""


class SftData(DataKeys):
    train: DataFile = Field(description="JSON Lines records {prompt, response} (or {text} for pretraining)")
    prompt_field: str | None = Field("prompt", description="null: no prompt, every token of the text is scored")
    response_field: str = "response"
    num_samples: int | None = Field(None, gt=0, description="first N records (default: all)")
    pack: bool = Field(False, description="pack documents into max_length sequences (plain text only)")

    @model_validator(mode="after")
    def _pack_plain(self) -> SftData:
        if self.pack and self.prompt_field is not None:
            raise ValueError(f"data.pack: true packs plain text; expected data.prompt_field: null, "
                             f"got {self.prompt_field!r}")
        return self


class PretrainData(SftData):
    """``fisherdist pretrain``'s data: packed by default (fisherdist.data.packing)."""

    prompt_field: str | None = Field(None, description="null: every token of the text is scored")
    response_field: str = "text"
    pack: bool = Field(True, description="pack documents into max_length sequences (EOS-separated)")


class SftTrain(SequenceSettings):
    """The trainer's keys and the sequence length (:class:`SequenceSettings`); SFT's own defaults."""

    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0, description="records per rank per step")


class SftConfig(RunConfig):
    """Schema of ``configs/{sft,finetune,pretrain}/*.yaml``: the run keys plus the sections below."""

    lora: LoraSettings | None = Field(default_factory=LoraSettings, description="null: train every weight")
    init: Literal["pretrained", "random"] = Field("pretrained", description="random: model.path's config only")
    data: SftData
    train: SftTrain = Field(default_factory=SftTrain)
    optim: OptimizerSettings = Field(default_factory=OptimizerSettings)

    @model_validator(mode="after")
    def _init_fits(self) -> SftConfig:
        if self.init == "random" and self.model.load != "full":
            raise ValueError("init=random needs model.load=full (a sharded load reads the weights from files)")
        return self


class PretrainConfig(SftConfig):
    """``fisherdist pretrain``: SftConfig with packed plain-text data by default."""

    data: PretrainData


def load_prompted(path: DataFile, tokenizer: Any, prompt_field: str | None, response_field: str,
                  num_samples: int | None = None) -> list[Prompted]:
    """Records -> (special prefix + prompt ids, response ids); without a prompt field, the text is the response."""
    fields = [f for f in (prompt_field, response_field) if f]
    rows = read_records(path, fields)[:num_samples]
    lead = special_prefix(tokenizer)
    if prompt_field is None:
        return [(list(lead), encode(tokenizer, x[response_field])) for x in rows]
    return [(lead + p, c) for p, c in (split_encode(tokenizer, x[prompt_field], x[response_field]) for x in rows)]


def load_training_records(d: SftData, tokenizer: Any, max_length: int) -> list[Prompted]:
    """:func:`load_prompted`, or with ``d.pack`` the documents packed into ``max_length`` sequences, each
    one record scored on every token."""
    if not d.pack:
        return load_prompted(d.train, tokenizer, d.prompt_field, d.response_field, d.num_samples)
    from fisherdist.data.packing import pack_texts

    rows = read_records(d.train, [d.response_field])[: d.num_samples]
    return [([], seq) for seq in pack_texts((x[d.response_field] for x in rows), tokenizer, max_length)]


class SftObjective(TrainHook):
    """The loss of one global step and its metric ``nll`` (the global token-mean NLL of the step)."""

    name = "sft"

    def __init__(self, wrapped: Any, records: Sequence[Prompted], max_length: int, pad_id: int) -> None:
        self.w, self.records, self.max_length, self.pad_id = wrapped, records, max_length, pad_id
        self.device = next(p for _, p in wrapped.named_trainable()).device
        self.value = torch.zeros(())

    def loss(self, batch: StepBatch) -> torch.Tensor:
        """This rank's share of the step's global token-mean NLL (zero weight on a rank with only padding)."""
        real = [i for i in batch.mine if i >= 0]
        items = [self.records[i] for i in (real or [0])]
        tb = collate_prompted([p for p, _ in items], [c for _, c in items], self.pad_id, self.max_length).to(self.device)
        self.value = token_mean_share(self.w.module, tb, bool(real), batch.world)
        return self.value

    def after_step(self, batch: StepBatch, row: dict[str, Any]) -> None:
        row["nll"] = step_mean(self.value, batch.world)


def records_fingerprint(records: Sequence[Prompted]) -> str:
    return hashlib.sha256(repr(list(records)).encode()).hexdigest()[:16]


def run_sft(wrapped: Any, records: Sequence[Prompted], settings: SequenceSettings, pad_id: int, *,
            checkpoint_dir: str | Path | None = None, hooks: Sequence[TrainHook] = (), name: str = "train",
            progress: bool = True, metrics: MetricsLogger | None = None) -> list[dict[str, Any]]:
    """SFT of ``wrapped`` (any backend, its optimizer) on ``records`` (:func:`load_prompted`): the per-step
    log, identical on every rank. ``hooks`` add loss terms / metrics (see :class:`TrainHook`); with a
    ``checkpoint_dir`` the run checkpoints, resumes and handles preemption (exit 75) like every stage;
    ``metrics`` gets one row per step."""
    objective = SftObjective(wrapped, records, settings.max_length, pad_id)
    trainer = Trainer(wrapped, len(records), settings, objective.loss, hooks=[objective, *hooks],
                      checkpoint_dir=checkpoint_dir, name=name, fingerprint=records_fingerprint(records), metrics=metrics)
    return trainer.run(progress)


Ctx = RunContext[SftConfig]


def train(r: Ctx) -> None:
    """Train on prompt -> response (prompt masked) -> ``models/{base,adapter,merged}`` or ``models/trained``."""
    from fisherdist.recipes.lora_run import export_trained, training_model
    from fisherdist.recipes.optimizers import optimizer_factory

    t, d = r.cfg.train, r.cfg.data
    records = load_training_records(d, r.tokenizer, t.max_length)
    opt = optimizer_factory(r.cfg.optim, t.lr, t.weight_decay, lambda: r.state["model"])
    w = training_model(r, t, opt, random_init=r.cfg.init == "random")
    history = run_sft(w, records, t, r.pad_id, checkpoint_dir=r.out / "checkpoints" / "train", metrics=r.metrics)
    r.write_json("train_log.json", history)
    path = export_trained(r, w, "merged")
    r.log(f"{r.cfg.optim.name}: nll {history[0]['nll']:.4f} -> {history[-1]['nll']:.4f} over {len(history)} steps "
          f"({len(records)} {'packed sequences' if d.pack else 'records'}) -> {path}")


STAGES = StageRegistry("sft", [("train", train)])
COMMANDS = {"sft": "SFT LoRA baseline (configs/sft/tiny.yaml)",
            "finetune": "fine-tune on {prompt, response}: LoRA or full weights, optim.name adamw | galore | natural_galore",
            "pretrain": "causal-LM training on plain text, full weights (configs/pretrain/tiny.yaml)"}


def register(sub: argparse._SubParsersAction) -> None:
    for name, text in COMMANDS.items():
        schema = PretrainConfig if name == "pretrain" else SftConfig
        config_command(sub, name, schema, partial(run_stages, STAGES, [ALL]), help=text,
                       config_help=f"YAML config (see configs/{name}/)", example="train.epochs=2 dist.nproc=2")
