"""``fisherdist vila importance|init|train|eval|run CONFIG [key=value ...]`` (``method: vila | fila``)."""

from __future__ import annotations

import argparse

from fisherdist.methods.vila.config import VilaConfig
from fisherdist.methods.vila.stages import STAGES
from fisherdist.recipes.cli import register_stages


def register(sub: argparse._SubParsersAction) -> None:
    register_stages(sub, STAGES, VilaConfig, help="VILA / FILA knowledge unlearning: importance, init, train, eval, "
                    "or run all", config_help="YAML recipe (see configs/vila/)", example="method=fila train.loss=npo")
