"""The one "load config -> spawn -> run" path behind every config-driven command.

A command validates its YAML (so bad input fails once, in the parent, before anything spawns), then
either re-launches itself on ``nproc`` local processes (outside torchrun / srun) or runs in this process,
holding ``out``'s run lock (:mod:`fisherdist.distributed.runlock`) throughout.
It sits beside :mod:`fisherdist.config`, below every layer, so the Fisher engine's CLI, the evaluation CLI
and the method recipes all share it without importing upward.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from fisherdist.config import dump_config, load_config

C = TypeVar("C", bound=BaseModel)
Run = Callable[[C, str], "int | None"]


def dist_nproc(cfg: Any) -> int:
    """Processes a config asks for: ``dist.nproc`` (most commands), a top-level ``nproc``, else one."""
    dist = getattr(cfg, "dist", None)
    return int(dist.nproc if dist is not None else getattr(cfg, "nproc", 1))


def launch(schema: type[C], config: str | Path | None, overrides: Sequence[str], argv: Sequence[str],
           run: Run[C]) -> int:
    """Validate ``config`` + ``overrides``, spawn ``fisherdist ARGV`` when the config asks for more
    processes than this one, else ``run(cfg, resolved_yaml)``; returns the exit status."""
    from fisherdist.distributed.runlock import run_lock
    from fisherdist.distributed.spawn import maybe_spawn

    cfg = load_config(schema, config, list(overrides))
    out = getattr(cfg, "out", None)
    with run_lock(out) if out is not None else contextlib.nullcontext():  # one live run per out directory
        code = maybe_spawn(dist_nproc(cfg), list(argv))
        if code is not None:
            return code
        return int(run(cfg, dump_config(cfg)) or 0)


def config_command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, schema: type[C], run: Run[C], *, help: str,
                   config_help: str, example: str, argv_head: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """``NAME CONFIG [key=value ...]`` running :func:`launch`; ``argv_head`` is how the command names
    itself when it re-launches (default ``[name]``; nested commands give their full path)."""
    head = list(argv_head) if argv_head is not None else [name]
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")

    def _func(args: argparse.Namespace) -> int:
        return launch(schema, args.config, args.overrides, [*head, args.config, *args.overrides], run)

    p.set_defaults(func=_func)
    return p
