"""A command group that exists only for tests/test_cli.py (put into ``COMMAND_MODULES`` by monkeypatch):
``probe CONFIG [key=value ...]`` loads a small schema and prints it; ``--crash`` raises a bug."""

from __future__ import annotations

import argparse

from fisherdist.config import Section, load_config


class ProbeConfig(Section):
    steps: int
    name: str = "probe"


def _run(args: argparse.Namespace) -> int:
    if args.crash:
        raise RuntimeError("a bug, not a user error")
    cfg = load_config(ProbeConfig, args.config, args.overrides)
    print(f"steps={cfg.steps} name={cfg.name}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="test-only command")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--crash", action="store_true")
    p.set_defaults(func=_run)
