"""``fisherdist agl fisher|train|eval|run CONFIG``: AlignGuard-LoRA and its baselines (configs/agl/)."""

from __future__ import annotations

import argparse

from fisherdist.methods.agl import stages
from fisherdist.methods.agl.config import AglConfig
from fisherdist.recipes.cli import register_stages
from fisherdist.recipes.stages import StageRegistry

STAGES = StageRegistry("agl", [("fisher", stages.fisher), ("train", stages.train), ("eval", stages.evaluate)])


def register(sub: argparse._SubParsersAction) -> None:
    register_stages(sub, STAGES, AglConfig, help="AlignGuard-LoRA vs plain LoRA and LoRA + EWC (configs/agl/tiny.yaml)",
                    config_help="YAML config (see configs/agl/)", example="train.max_steps=20 dist.nproc=2")
