"""The ``fisherdist`` command. Each command group lives beside the code it drives and registers itself
through ``register(subparsers)``; this file only wires them together and turns user errors into one line."""

from __future__ import annotations

import argparse
import sys

from fisherdist.distributed import cli as distributed_cli
from fisherdist.errors import FisherdistError
from fisherdist.eval import cli as eval_cli
from fisherdist.fisher import cli as fisher_cli
from fisherdist.methods import sft
from fisherdist.methods.agl import cli as agl_cli
from fisherdist.methods.lqlora import cli as lqlora_cli
from fisherdist.methods.suv import cli as suv_cli
from fisherdist.methods.vila import cli as vila_cli
from fisherdist.models import merge as merge_cli
from fisherdist.plan import cli as plan_cli
from fisherdist.world import cli as world_cli

COMMAND_MODULES = [distributed_cli, fisher_cli, suv_cli, merge_cli, sft, eval_cli, world_cli, lqlora_cli, plan_cli, vila_cli,
                   agl_cli]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisherdist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
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
