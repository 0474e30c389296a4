"""``fisherdist METHOD STAGE CONFIG [key=value ...]`` for every stage of a method's registry (and ``run``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial

from fisherdist.commands import config_command
from fisherdist.recipes.config import RunConfig
from fisherdist.recipes.stages import ALL, StageRegistry, open_run


def run_stages(registry: StageRegistry, names: Sequence[str], cfg: RunConfig, config_text: str) -> None:
    """One process group, one context, the named stages in order."""
    registry.run(open_run(cfg, config_text), names)


def register_stages(sub: argparse._SubParsersAction, registry: StageRegistry, schema: type[RunConfig], *,
                    help: str, config_help: str, example: str) -> argparse.ArgumentParser:
    """``METHOD`` with one sub-command per stage, plus ``run`` for all of them in one process group."""
    p = sub.add_parser(registry.method, help=help)
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name in [*registry.names, ALL]:
        config_command(stages, name, schema, partial(run_stages, registry, [name]), help=registry.help(name),
                       config_help=config_help, example=example, argv_head=[registry.method, name])
    return p
