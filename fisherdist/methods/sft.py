"""SFT LoRA baseline: ``fisherdist sft CONFIG`` fine-tunes a LoRA adapter on ``{prompt, response}`` records
(the loss scores the response only) and exports the adapter and the merged model.

The whole method on the recipes layer, as README's "Adding a method" walks through it: a config that adds
only its ``data:`` and ``train:`` sections to :class:`LoraRunConfig`, one stage, the shared SFT loss, the
shared export, and one line of CLI. Data parallelism: step s takes the global records
``[s*B*W, (s+1)*B*W)`` of a seeded permutation; each rank's loss is its summed response NLL times W over
the step's global response-token count, so the backend's gradient average is the gradient of the global
token-mean NLL, whatever the world size.
"""

from __future__ import annotations

import argparse
import math
from functools import partial
from typing import Any

import torch
from pydantic import Field

from fisherdist.commands import config_command
from fisherdist.config import DataFile, Section
from fisherdist.data.jsonl import read_records, special_prefix, split_encode
from fisherdist.distributed.collectives import all_reduce_sum
from fisherdist.recipes.cli import run_stages
from fisherdist.recipes.config import LoraRunConfig
from fisherdist.recipes.losses import collate_prompted, label_tokens, sft_loss
from fisherdist.recipes.stages import ALL, RunContext, StageRegistry


class SftData(Section):
    train: DataFile = Field(description="JSON Lines records {prompt, response}")
    prompt_field: str = "prompt"
    response_field: str = "response"
    num_samples: int | None = Field(None, gt=0, description="first N records (default: all)")


class SftTrain(Section):
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0, description="records per rank per step")
    max_length: int = Field(128, gt=1)
    seed: int = 0


class SftConfig(LoraRunConfig):
    """Schema of ``configs/sft/*.yaml``: the run keys plus ``data`` and ``train``."""

    data: SftData
    train: SftTrain = Field(default_factory=SftTrain)


Ctx = RunContext[SftConfig]


def _records(r: Ctx) -> list[tuple[list[int], list[int]]]:
    d = r.cfg.data
    rows = read_records(d.train, [d.prompt_field, d.response_field])[: d.num_samples]
    lead = special_prefix(r.tokenizer)
    return [(lead + p, c) for p, c in (split_encode(r.tokenizer, x[d.prompt_field], x[d.response_field]) for x in rows)]


def _loss(r: Ctx, w: Any, items: list[tuple[list[int], list[int]]], real: bool) -> torch.Tensor:
    """This rank's share of the step's global token-mean NLL (zero weight on a rank with only padding)."""
    device = next(w.unwrapped.parameters()).device
    batch = collate_prompted([p for p, _ in items], [c for _, c in items], r.pad_id, r.cfg.train.max_length).to(device)
    mine = label_tokens(batch.labels).sum() * int(real)
    tokens = all_reduce_sum(mine.double().reshape(1))
    logits = w.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return sft_loss(logits, batch.labels).sum() * int(real) * r.world / tokens.to(logits.dtype)


def _steps(r: Ctx, n: int) -> list[list[int]]:
    """This rank's record indices for every step (padded with -1), epochs concatenated."""
    t, per = r.cfg.train, r.cfg.train.batch_size
    g = torch.Generator().manual_seed(t.seed)
    out = []
    for _ in range(t.epochs):
        order = torch.randperm(n, generator=g).tolist()
        for s in range(math.ceil(n / (per * r.world))):
            glob = order[s * per * r.world : (s + 1) * per * r.world]
            out.append([glob[i] if i < len(glob) else -1 for i in range(r.rank * per, (r.rank + 1) * per)])
    return out[: t.max_steps]


def train(r: Ctx) -> None:
    """Fine-tune the adapter on prompt -> response (prompt masked) -> ``models/{adapter,merged}``."""
    from fisherdist.models.export import export_adapter
    from fisherdist.models.peft_utils import apply_lora
    from fisherdist.models.sharded_load import load_wrapped

    t, m = r.cfg.train, r.cfg.model
    w = load_wrapped(m.path, r.dtype, r.cfg.dist.backend, r.env.device, load=m.load, seed=t.seed,
                     prepare=lambda base: apply_lora(base, r.cfg.lora),
                     optimizer_factory=lambda ps: torch.optim.AdamW(ps, lr=t.lr, weight_decay=0.0),
                     **r.cfg.backend_options(t.batch_size, None))
    records, history = _records(r), []
    for idx in _steps(r, len(records)):
        real = [i for i in idx if i >= 0]
        loss = _loss(r, w, [records[i] for i in (real or [0])], bool(real))
        w.backward(loss)
        w.step()
        history.append({"step": len(history) + 1, "nll": float(all_reduce_sum(loss.detach().double().reshape(1))) / r.world})
    tensors = w.gather_trainable()
    r.write_json("train_log.json", history)
    if r.rank == 0:
        export_adapter(tensors, m.path, r.cfg.lora, r.out / "models" / "adapter", r.out / "models" / "merged", r.dtype)
    r.log(f"sft: nll {history[0]['nll']:.4f} -> {history[-1]['nll']:.4f} over {len(history)} steps")


STAGES = StageRegistry("sft", [("train", train)])


def register(sub: argparse._SubParsersAction) -> None:
    config_command(sub, "sft", SftConfig, partial(run_stages, STAGES, [ALL]), help="SFT LoRA baseline (configs/sft/tiny.yaml)",
                   config_help="YAML config (see configs/sft/)", example="train.epochs=2 dist.nproc=2")
