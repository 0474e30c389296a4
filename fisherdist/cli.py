"""The ``fisherdist`` command. Each command group lives beside the code it drives and registers itself
through ``register(subparsers)``; this file only wires them together and turns user errors into one line."""

from __future__ import annotations

import argparse
import importlib
import sys

from fisherdist.errors import FisherdistError

# Modules that define ``register(subparsers: argparse._SubParsersAction) -> None``.
COMMAND_MODULES = [
    "fisherdist.distributed.cli",
    "fisherdist.fisher.cli",
    "fisherdist.methods.suv.cli",
    "fisherdist.eval.cli",
    "fisherdist.world.cli",
    "fisherdist.methods.lqlora.cli",
    "fisherdist.plan.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisherdist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fisherdist.distributed.failures import expected_failures

    try:
        with expected_failures():  # a lost peer or Ctrl-C: one line, no traceback
            return int(args.func(args) or 0)
    except FisherdistError as e:
        print(f"fisherdist: error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))


if __name__ == "__main__":
    sys.exit(main())
